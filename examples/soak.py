"""Soak: many consecutive ``generate()`` calls on one compiled tiny model.

    python examples/soak.py                      # 200 calls, Inductor lowering, recompile limit 64
    python examples/soak.py --calls 10 --lowering eager
    python examples/soak.py --recompile-limit 8  # Dynamo's default: hit within 20 calls (warned)

Prints resident memory (VmRSS) after warm-up and at the end, every backend
invocation (a compile or recompile: which graph kinds it rewrote, for which
input shape), whether Dynamo's recompile limit was hit (after it, new shapes
run uncompiled: see docs/design.md, "Limits"), and whether a fixed probe
prompt gives the same tokens and logits at the start and at the end (state
leaking from one request into a later one would change them). ``--json``
writes the figures as one object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time

import torch

import pop_fx
from pop_fx import backend as _backend
from pop_fx.tools.models import tiny_model


def rss_mib() -> float:
    """Resident set size of this process (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class CountingCompiler:
    """Wraps PopCompiler.__call__: one record per graph Dynamo hands the backend."""

    def __init__(self):
        self.calls: list[dict] = []
        self._orig = _backend.PopCompiler.__call__

    def __enter__(self):
        orig, calls = self._orig, self.calls

        def counted(compiler, gm, example_inputs):
            from torch._dynamo.utils import counters

            before = dict(counters["pop"])
            fn = orig(compiler, gm, example_inputs)
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 2][:1]
            counts = {k: v - before.get(k, 0) for k, v in counters["pop"].items() if v != before.get(k, 0)}
            calls.append({"counts": counts, "input_ids_shape": [str(s) for s in shapes]})
            return fn

        _backend.PopCompiler.__call__ = counted
        return self

    def __exit__(self, *exc):
        _backend.PopCompiler.__call__ = self._orig


def generate(model, ids, mask, new_tokens):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)


def batch(rng: random.Random, vocab: int, max_batch: int, max_len: int):
    """A left-padded batch of random prompts of random lengths."""
    b = rng.randint(1, max_batch)
    lens = [rng.randint(2, max_len) for _ in range(b)]
    L = max(lens)
    ids = torch.zeros(b, L, dtype=torch.long)
    mask = torch.zeros(b, L, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, L - n:] = torch.tensor([rng.randint(4, vocab - 1) for _ in range(n)])
        mask[i, L - n:] = 1
    return ids, mask


def soak(calls: int = 200, family: str = "llama", lowering: str = "inductor", scope: str = "batch",
         warmup: int = 20, new_tokens: int = 4, seed: int = 0, recompile_limit: int | None = None) -> dict:
    limit = torch._dynamo.config.recompile_limit if recompile_limit is None else recompile_limit
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _soak(calls, family, lowering, scope, warmup, new_tokens, random.Random(seed))


def _soak(calls, family, lowering, scope, warmup, new_tokens, rng) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(family)
    pop_fx.compile(model, sparsity=0.5, candidate_ratio=0.2, lowering=lowering, scope=scope)
    vocab = model.config.vocab_size
    probe = torch.tensor([[5, 17, 99, 42, 7, 201]])
    probe_mask = torch.ones_like(probe)
    with CountingCompiler() as counter:
        t0 = time.perf_counter()
        first = generate(model, probe, probe_mask, new_tokens)
        rss = {"start": rss_mib()}
        for i in range(calls):
            ids, mask = batch(rng, vocab, max_batch=4, max_len=12)
            generate(model, ids, mask, new_tokens)
            if i + 1 == warmup:
                gc.collect()
                rss["after_warmup"] = rss_mib()
                compiles_at_warmup = len(counter.calls)
        gc.collect()
        rss["end"] = rss_mib()
        last = generate(model, probe, probe_mask, new_tokens)
        elapsed = time.perf_counter() - t0
    same_tokens = torch.equal(first.sequences, last.sequences)
    logit_diff = max((a - b).abs().max().item() for a, b in zip(first.logits, last.logits))
    base = rss.get("after_warmup", rss["start"])
    return {
        "calls": calls, "family": family, "lowering": lowering, "scope": scope, "seconds": round(elapsed, 1),
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_warmup_pct": round(100 * (rss["end"] - base) / base, 2),
        "backend_invocations": len(counter.calls),
        "backend_invocations_after_warmup": len(counter.calls) - compiles_at_warmup if calls >= warmup else None,
        "graphs": counter.calls,
        "recompile_limit": torch._dynamo.config.recompile_limit,
        "recompile_limit_hit": bool(vars(model).get("_pop_recompile_limit_hit")),
        "report_warnings": pop_fx.report(model).warnings,
        "probe_same_tokens": same_tokens, "probe_max_logit_diff": logit_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    ap.add_argument("--scope", default="batch", choices=["batch", "sequence"])
    ap.add_argument("--warmup", type=int, default=20)
    # 64, not Dynamo's 8: batch 1 vs >1, the first decode step (static cache length) and cache-stride guards
    # make ~14 graphs here, and past the limit new shapes would run uncompiled (try --recompile-limit 8).
    ap.add_argument("--recompile-limit", type=int, default=64, help="torch._dynamo.config.recompile_limit")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))
    r = soak(args.calls, args.family, args.lowering, args.scope, min(args.warmup, args.calls),
             recompile_limit=args.recompile_limit)
    print(f"{r['calls']} generate() calls ({r['family']}, lowering={r['lowering']}, scope={r['scope']}) "
          f"in {r['seconds']} s")
    print(f"RSS MiB: {r['rss_mib']}  growth after warm-up: {r['rss_growth_after_warmup_pct']}%")
    print(f"backend invocations (compiles + recompiles): {r['backend_invocations']}, "
          f"after warm-up: {r['backend_invocations_after_warmup']}")
    for i, g in enumerate(r["graphs"]):
        print(f"  graph {i}: {g['counts']} first 2-D input {g['input_ids_shape']}")
    print(f"recompile limit {r['recompile_limit']} hit: {r['recompile_limit_hit']}")
    for w in r["report_warnings"]:
        print(f"  report warning: {w}")
    print(f"probe prompt: same tokens {r['probe_same_tokens']}, max logit diff {r['probe_max_logit_diff']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
