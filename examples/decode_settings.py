"""Before and after of each decode setting of issue 34, side by side in one process: SmolLM2, batch 1, 2 threads.

    python examples/decode_settings.py                            # fp32 and bf16, 5 interleaved rounds
    python examples/decode_settings.py --dtypes bfloat16 --rounds 3 --json out/settings.json

Each row is its own compiled top module over the same Parameters; every round times each row once (64 new tokens
after a 6-token prompt, decode tokens/s between the first and the last new token), so the machine's noise falls on
all rows; medians are printed with the dense model's GB/s (its weight bytes per token × tokens/s) and the ratio to
the first row. Rows:

* ``stock``                 ``model.compile()`` — stock Inductor, ATen GEMV for every linear (the issue's baseline)
* ``dense, GEMM linears``   ``pop_fx.compile(sparsity=0, kernels="torch")``: pop::linear pinned to ATen
* ``dense``                 ``pop_fx.compile(sparsity=0)``: every decode linear autotuned (GEMM or reduction)
* ``dense, whole graph``    ``regional=False``: one graph, no Python between the layers (longer compile)
* ``dense, cpp_wrapper``    ``inductor={"cpp_wrapper": True}``: C++ wrappers instead of Python ones
* ``dense, greedy loop``    ``pop_fx.greedy`` instead of ``generate()``
* ``POP, GEMM linears`` / ``POP`` / ``POP, whole graph`` / ``POP, greedy loop``   the same for r 0.5 γ 0.1
* ``int8-values`` / ``int8-values, whole graph``   r 0.5, γ 2, ``candidate_proxy="int8-values"`` (issue 31)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

PROMPT = "The capital of France is"
NEW_TOKENS = 64

POP = dict(sparsity=0.5, candidate_ratio=0.1)
VALUES = dict(sparsity=0.5, candidate_ratio=2.0, candidate_proxy="int8-values")
ROWS = {
    "stock": (None, "generate"),
    "dense, GEMM linears": (dict(sparsity=0.0, kernels="torch"), "generate"),
    "dense": (dict(sparsity=0.0), "generate"),
    "dense, whole graph": (dict(sparsity=0.0, regional=False), "generate"),
    "dense, cpp_wrapper": (dict(sparsity=0.0, inductor={"cpp_wrapper": True}), "generate"),
    "dense, greedy loop": (dict(sparsity=0.0), "greedy"),
    "POP, GEMM linears": (dict(POP, kernels="torch"), "generate"),
    "POP": (POP, "generate"),
    "POP, whole graph": (dict(POP, regional=False), "generate"),
    "POP, greedy loop": (POP, "greedy"),
    "int8-values": (VALUES, "generate"),
    "int8-values, whole graph": (dict(VALUES, regional=False), "generate"),
}


def timed(model, ids, loop: str) -> tuple[list[int], float]:
    import pop_fx
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    if loop == "greedy":
        toks, t = pop_fx.greedy(model, ids, NEW_TOKENS, stamps=True)
        return toks[0].tolist(), (len(t) - 1) / (t[-1] - t[0])
    st = StepStamps()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             logits_processor=LogitsProcessorList([st]))
    return out[0, ids.shape[1]:].tolist(), st.decode_rate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    ap.add_argument("--json")
    args = ap.parse_args()

    import pop_fx
    from pop_fx.tools.model_copies import shallow_copy
    from pop_fx.tools.models import load_model

    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    print(f"{datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}, 2 threads, load {os.getloadavg()[0]:.2f}",
          flush=True)
    result = {"date": f"{datetime.now():%Y-%m-%d %H:%M}", "rows": {}}
    for dt in args.dtypes:
        base, tok = load_model("smollm2", getattr(torch, dt))
        nbytes = sum(p.numel() * p.element_size() for p in base.parameters()) + base.lm_head.weight.numel() * \
            base.lm_head.weight.element_size()
        ids = tok(PROMPT, return_tensors="pt").input_ids
        models, compiled = {}, {}
        for name in args.rows:
            fields, loop = ROWS[name]
            key = repr(fields)
            if key not in compiled:
                m = shallow_copy(base)
                m.compile() if fields is None else pop_fx.compile(m, **fields)
                compiled[key] = m
            t = time.perf_counter()
            toks, _ = timed(compiled[key], ids, loop)
            print(f"  {dt} {name:22s} first call {time.perf_counter() - t:5.1f} s  {tok.decode(toks[:6])!r}",
                  flush=True)
            models[name] = (compiled[key], loop)
        rates = {name: [] for name in models}
        tokens = {}
        for _ in range(args.rounds):
            for name, (m, loop) in models.items():
                toks, rate = timed(m, ids, loop)
                rates[name].append(rate)
                tokens[name] = toks
        first = statistics.median(rates[args.rows[0]])
        print(f"\n{dt}: SmolLM2 batch 1, {NEW_TOKENS} new tokens, medians of {args.rounds} rounds, load "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'row':24s} {'tok/s':>7s} {'dense GB/s':>10s} {'x first':>8s}  tokens = stock")
        for name, v in rates.items():
            med = statistics.median(v)
            print(f"{name:24s} {med:7.1f} {med * nbytes / 1e9:10.1f} {med / first:8.2f}  "
                  f"{tokens[name] == tokens[args.rows[0]]}")
        result["rows"][dt] = rates
        del models, compiled, base
        torch._dynamo.reset()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
