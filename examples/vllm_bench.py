"""Decode tokens/s of SmolLM2 in vLLM (its CPU build) with and without POP, and under transformers' generate().

    .venv-vllm/bin/python examples/vllm_bench.py vllm --dtype bfloat16 --mode eager      # one vLLM, all variants
    .venv-vllm/bin/python examples/vllm_bench.py vllm --dtype float32 --mode compiled
    .venv/bin/python examples/vllm_bench.py hf --dtype bfloat16                        # dense Inductor, pop_fx.compile

vLLM: ONE engine with the plugin loaded (``POP_FX_VLLM``, decode="auto": the per-batch-size path table it timed
at load); the rounds alternate the variants of its decode steps — ``dense`` (vLLM's own MLP: the plugin forces its
dense path), ``layouts`` and ``ragged`` (POP's two decode paths, forced), ``auto`` (the table: POP where it timed
faster, dense elsewhere) — and, for the record, the same engine's dense figure without the plugin comes from a
second process (``--variants plain``). Concurrency N = N requests of 64-token prompts (different windows of the
WEB text) decoding together; decode tokens/s = N·T / (time of a T+1-token generate − time of a 1-token one).
Each figure is the median over rounds; the 1-minute load average (``os.getloadavg``) is printed beside it: the
machine is shared, and a loaded machine makes every figure noisy.

``--threads`` (default 1) sets OMP_NUM_THREADS for both stacks. vLLM 0.32's CPU worker means to serve with one
intra-op thread but blocks ``torch.set_num_threads`` after binding its OpenMP threads (one per core), so without
OMP_NUM_THREADS it runs 2 threads here; on this shared 2-core machine a 2-thread oneDNN GEMV then waits ~8 ms on
a descheduled thread (measured: 28 us with 1 thread, 8000 us with 2, same handle).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "pop_fx" / "data" / "web_bible_sample.txt"


def load() -> float:
    return os.getloadavg()[0]


def prompts(tok, n: int, length: int = 64) -> list[list[int]]:
    ids = tok(TEXT.read_text()[:200_000])["input_ids"]
    stride = (len(ids) - length) // max(n, 1)
    return [ids[i * stride : i * stride + length] for i in range(n)]


def smollm2_folder() -> str:
    # the project's converted SmolLM2 (pop_fx.tools.models.smollm2_path; run `pop-fx demo` or the tests once)
    root = Path(os.environ.get("POP_FX_CACHE") or Path.home() / ".cache" / "pop-fx")
    folder = root / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is missing: run `.venv/bin/python -c \"from pop_fx.tools.models import "
                         "smollm2_path; smollm2_path()\"` first")
    return str(folder)


# ---------------------------------------------------------------- vLLM ---------------------------------------------
def bench_vllm(args) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    plain = args.variants == ["plain"]
    if plain:
        os.environ.pop("POP_FX_VLLM", None)
    else:
        os.environ["POP_FX_VLLM"] = json.dumps({"sparsity": args.sparsity, "candidate_ratio": args.candidate_ratio,
                                                "decode": "auto"})
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    N = max(args.concurrency)
    t0 = time.perf_counter()
    llm = LLM(model=smollm2_folder(), dtype=args.dtype, enforce_eager=args.mode == "eager", seed=0,
              max_model_len=64 + args.tokens + 8, max_num_seqs=N, max_num_batched_tokens=max(512, 64 * N),
              distributed_executor_backend="uni", kv_cache_memory_bytes=args.kv_mb << 20,
              enable_prefix_caching=False)
    print(f"# vLLM {args.dtype} {args.mode}: engine up in {time.perf_counter() - t0:.0f} s", flush=True)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    pop = getattr(runner, "_pop", None)
    if pop is not None:
        print(f"# decode path table (timed at load): {pop.step.table}", flush=True)
    tok = llm.get_tokenizer()
    batches = {n: [TokensPrompt(prompt_token_ids=p) for p in prompts(tok, n)] for n in args.concurrency}
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.tokens + 1, ignore_eos=True)

    def decode_tps(n: int) -> float:
        t = time.perf_counter()
        llm.generate(batches[n], one, use_tqdm=False)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate(batches[n], full, use_tqdm=False)
        return n * args.tokens / (time.perf_counter() - t - t_prefill)

    variants = args.variants
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for n in args.concurrency:
            for v in variants:
                if pop is not None:
                    pop.step.forced = None if v == "auto" else v
                before = load()
                tps = decode_tps(n)
                if r:
                    times.setdefault((v, n), []).append((tps, max(before, load())))
        if r:
            print(f"# round {r}: " + ", ".join(f"{v}@{n} {statistics.median(x[0] for x in t):.1f}"
                                              for (v, n), t in times.items()), flush=True)
    rows = []
    for (v, n), t in times.items():
        rows.append({"stack": "vLLM", "dtype": args.dtype, "mode": args.mode, "variant": v, "N": n,
                     "tok_s": statistics.median(x[0] for x in t), "load": statistics.median(x[1] for x in t)})
    return rows


# ---------------------------------------------------------------- transformers generate() -----------------------
def bench_hf(args) -> list[dict]:
    import copy

    import torch

    import pop_fx
    from pop_fx.config import PopConfig
    from pop_fx.tools.models import load_model

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    base, tok = load_model("smollm2", dtype=args.dtype)
    models = {}
    for v in args.variants:
        m = copy.deepcopy(base).eval()
        if v == "dense-inductor":
            m.compile(backend="inductor")
        elif v == "pop_fx.compile-dense":  # compiled as POP is (regional), nothing pruned: POP's own baseline
            pop_fx.compile(m, PopConfig(sparsity=0.0))
        elif v == "pop_fx.compile":
            pop_fx.compile(m, PopConfig(sparsity=args.sparsity, candidate_ratio=args.candidate_ratio))
        elif v == "pop_fx.compile-sequence":
            pop_fx.compile(m, PopConfig(sparsity=args.sparsity, candidate_ratio=args.candidate_ratio,
                                        scope="sequence"))
        models[v] = m
    batches = {n: torch.tensor(prompts(tok, n)) for n in args.concurrency}

    @torch.no_grad()
    def decode_tps(m, n: int) -> float:
        ids = batches[n]
        kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1, **kw)
        return n * args.tokens / (time.perf_counter() - t - t_prefill)

    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds + 1):
        for n in args.concurrency:
            for v, m in models.items():
                before = load()
                tps = decode_tps(m, n)
                if r:
                    times.setdefault((v, n), []).append((tps, max(before, load())))
        if r:
            print(f"# round {r}: " + ", ".join(f"{v}@{n} {statistics.median(x[0] for x in t):.1f}"
                                              for (v, n), t in times.items()), flush=True)
    return [{"stack": "transformers", "dtype": args.dtype, "mode": "compiled", "variant": v, "N": n,
             "tok_s": statistics.median(x[0] for x in t), "load": statistics.median(x[1] for x in t)}
            for (v, n), t in times.items()]


def print_table(rows: list[dict], ref: str) -> None:
    """One row per variant, one column per concurrency: tok/s (× ``ref`` at that concurrency) [1-min load]."""
    conc = sorted({r["N"] for r in rows})
    base = {r["N"]: r["tok_s"] for r in rows if r["variant"] == ref}
    print("| stack | dtype | mode | variant | " + " | ".join(f"N={n}" for n in conc) + " |")
    print("|---|---|---|---|" + "---|" * len(conc))
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for n in conc:
            r = next(x for x in rows if x["variant"] == v and x["N"] == n)
            ratio = f" ({r['tok_s'] / base[n]:.2f}×)" if n in base else ""
            cells.append(f"{r['tok_s']:.1f}{ratio} [{r['load']:.1f}]")
        r0 = rows[0]
        print(f"| {r0['stack']} | {r0['dtype']} | {r0['mode']} | {v} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stack", choices=["vllm", "hf"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--mode", default="eager", choices=["eager", "compiled"], help="vLLM: enforce_eager or not")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--candidate-ratio", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="vllm: dense layouts ragged auto (one engine), or plain (no plugin, another process); "
                         "hf: dense-inductor pop_fx.compile-dense pop_fx.compile pop_fx.compile-sequence")
    ap.add_argument("--kv-mb", type=int, default=512, help="vLLM's KV cache, MiB")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for both stacks (vLLM's CPU worker otherwise keeps one OpenMP thread per "
                         "bound core; on a shared machine 2 threads stall oneDNN's GEMVs for milliseconds)")
    ap.add_argument("--json", type=Path, default=None, help="append the rows to this JSON-lines file")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.stack == "vllm":
        args.variants = args.variants or ["dense", "layouts", "ragged", "auto"]
        rows, ref = bench_vllm(args), "dense" if args.variants != ["plain"] else "plain"
    else:
        import torch

        torch.set_num_threads(args.threads)
        args.variants = args.variants or ["dense-inductor", "pop_fx.compile-dense", "pop_fx.compile",
                                          "pop_fx.compile-sequence"]
        rows, ref = bench_hf(args), "pop_fx.compile-dense" if "pop_fx.compile-dense" in args.variants else \
            "dense-inductor"
    print(f"\nDecode tokens/s, SmolLM2, sparsity={args.sparsity}, candidate_ratio={args.candidate_ratio}, "
          f"{args.tokens} tokens x {args.rounds} rounds, median; (x {ref}); [1-min load average]")
    print_table(rows, ref)
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
