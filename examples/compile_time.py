"""Regional vs whole-model compilation on SmolLM2: cold compile time, decode speed, and the per-call state lookup.

    python examples/compile_time.py                 # cold first token (fresh process, empty Inductor cache) and
                                                    # decode tokens/s, regional vs whole, dense and POP r=0.5
    python examples/compile_time.py --cold-only     # only the cold compiles
    python examples/compile_time.py --decode-only --rounds 5

Cold: each configuration in a process of its own with an empty ``TORCHINDUCTOR_CACHE_DIR`` (what a new user
meets; then warm: a second process over that cache), timing ``pop_fx.compile`` + ``generate(max_new_tokens=1)``
(the prefill graph) and then the first 8 tokens (the two decode graphs), with how many decode ops Inductor's
autotuner benchmarked (``kernels="auto"``). Decode: the four models side by side in one process, rounds interleaved, decode
tokens/s between the first and the last new token (``pop_fx.tools.timing.StepStamps``); the dense model's weight
GB/s is printed beside it (memory speed here moves by up to 2x from day to day). The lookup: what the backend's
``Binder`` adds to every call of a SmolLM2 decode graph (30 sites), against the step it serves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # name -> pop_fx.compile fields
    "dense regional": dict(sparsity=0.0, regional=True),
    "dense whole": dict(sparsity=0.0, regional=False),
    "pop regional": dict(sparsity=0.5, candidate_ratio=0.1, regional=True),
    "pop whole": dict(sparsity=0.5, candidate_ratio=0.1, regional=False),
}
PROMPT = "The capital of France is"


def _cold_child(name: str) -> None:
    import torch

    import pop_fx
    from pop_fx.tools.models import load_model

    model, tok = load_model("smollm2")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    pop_fx.compile(model, **CONFIGS[name])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    t2 = time.perf_counter()
    from pop_fx import autotune

    hows = [d.how for d in autotune.decisions()]
    print(json.dumps({"name": name, "first_token_s": t1 - t0, "then_8_tokens_s": t2 - t1,
                      "tuned": sum(h == "measured" for h in hows), "tune_cached": sum(h == "cached" for h in hows),
                      "text": tok.decode(out[0][ids.shape[1]:])}))


def cold(names) -> list[dict]:
    """Each configuration twice in fresh processes over one new Inductor cache: cold (empty cache: every graph
    compiled, every autotuned op benchmarked), then warm (Inductor's FX graph and autotune caches hit)."""
    rows = []
    for name in names:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="pop-cold-"))
        for when in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "when": when})
            r = rows[-1]
            print(f"  {when} {name:16s} compile + first token {r['first_token_s']:6.1f} s, then 8 tokens "
                  f"{r['then_8_tokens_s']:5.1f} s, ops benchmarked {r['tuned']} (from cache {r['tune_cached']})  "
                  f"{r['text']!r}", flush=True)
    return rows


def decode(rounds: int, new_tokens: int) -> dict:
    import torch

    import pop_fx
    from pop_fx.tools.demo import generate_timed
    from pop_fx.tools.models import load_model

    torch._dynamo.config.recompile_limit = 64  # four compiled copies of one forward
    models = {}
    for name, fields in CONFIGS.items():
        model, tok = load_model("smollm2")
        models[name] = pop_fx.compile(model, **fields)
        generate_timed(model, tok, PROMPT, new_tokens, warmup=True)
    rates = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(generate_timed(model, tok, PROMPT, new_tokens)[1])
    med = {name: statistics.median(v) for name, v in rates.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in models["dense whole"].parameters())
    head = models["dense whole"].lm_head.weight  # tied to the embedding: read again as the LM head
    step_bytes = weight_bytes + head.numel() * head.element_size()
    for name, r in med.items():
        print(f"  decode {name:16s} {r:6.2f} tokens/s")
    print(f"  regional / whole: dense {med['dense regional'] / med['dense whole']:.3f}, "
          f"POP {med['pop regional'] / med['pop whole']:.3f}; POP / dense, regional "
          f"{med['pop regional'] / med['dense regional']:.3f}, whole {med['pop whole'] / med['dense whole']:.3f}; "
          f"dense whole streams {step_bytes * med['dense whole'] / 1e9:.1f} GB/s of weights")
    return {"tokens_per_s": med, "rounds": rates, **_lookup(models["pop regional"], tok, med["pop regional"])}


def _lookup(model, tok, rate: float) -> dict:
    """Time the Binder of the POP model's decode graph alone, on the weights of a real call."""
    import torch

    from pop_fx import binding

    seen = {}
    original = binding.Binder.__call__

    def spy(self, args):
        if self.phase == "decode" and len(self.slots) >= 30:
            seen["binder"], seen["args"] = self, list(args)
        return original(self, args)

    binding.Binder.__call__ = spy
    try:
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        binding.Binder.__call__ = original
    b, args = seen["binder"], seen["args"]
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        b(args)
    us = (time.perf_counter() - t) / n * 1e6
    step_us = 1e6 / rate
    print(f"  state lookup per decode call: {us:.1f} us for {len(b.slots)} sites, {us / step_us:.3%} of a "
          f"{step_us / 1e3:.1f} ms POP step")
    return {"lookup_us": us, "step_us": step_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cold-only", action="store_true", help="only the cold compiles")
    ap.add_argument("--decode-only", action="store_true", help="only the decode speed and the lookup cost")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model (default 5)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per timed generate() (default 64)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="which cold compiles to run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.child:
        return _cold_child(args.child)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}", flush=True)
    out = {}
    if not args.decode_only:
        out["cold"] = cold(args.configs)
    if not args.cold_only:
        out["decode"] = decode(args.rounds, args.new_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
