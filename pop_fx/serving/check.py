"""The engine-contract harness as a script: N randomized schedules, every request against its solo oracle.

    python -m pop_fx.serving.check --schedules 200            # docs/serving.md's figure
    python -m pop_fx.serving.check --schedules 20 --family qwen2

Each schedule draws (from its seed) 1–6 requests with random prompts (1–24 tokens), lengths (1–8 new tokens)
and arrival steps, 1–4 slots, a token budget, a chunk size bound, a preemption rate and whether decode uses
per-slot layouts; the engine runs them and every request's tokens must equal
``engine.solo`` (``reference.pruned``, scope="sequence", prefill="dense", the request alone, its prompt in
one forward).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pop_fx.config import PopConfig
from pop_fx.serving.engine import Engine, Policy, Spec, run_schedule, solo


def draw(seed: int, vocab: int = 256) -> tuple[list[Spec], int, Policy, bool, PopConfig]:
    """One randomized schedule: (requests, slots, packing policy, per-slot layouts, POP config)."""
    rng = random.Random(seed)
    specs = [Spec([rng.randrange(3, vocab) for _ in range(rng.randint(1, 24))], rng.randint(1, 8), rng.randint(0, 6))
             for _ in range(rng.randint(1, 6))]
    policy = Policy(token_budget=rng.randint(1, 24), max_chunk=rng.randint(1, 12),
                    p_preempt=rng.choice([0.0, 0.0, 0.1, 0.3]))
    config = PopConfig(sparsity=rng.choice([0.3, 0.5, 0.7]), candidate_ratio=rng.choice([0.0, 0.1, 0.2, 2.0]))
    return specs, rng.randint(1, 4), policy, rng.random() < 0.3, config


def check(model, seed: int) -> tuple[list[int], dict]:
    """Run schedule ``seed``; returns the rids whose tokens differ from the oracle, and what the schedule did."""
    specs, slots, policy, layouts, config = draw(seed, model.config.vocab_size)
    engine = Engine(model, config, max_slots=slots, layouts=layouts)
    reqs = run_schedule(engine, specs, random.Random(seed + 1), policy)
    bad = [r.rid for r in reqs if r.out != solo(model, r.spec.prompt, r.spec.max_new, config)]
    stats = {"requests": len(reqs), "chunked": sum(r.chunks > 1 for r in reqs),
             "preempted": sum(r.preemptions > 0 for r in reqs), "layouts": layouts}
    return bad, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--family", default="llama", help="a tiny model family of pop_fx.tools.models (llama, qwen2, ...)")
    args = ap.parse_args(argv)
    from pop_fx.tools.models import tiny_model

    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the machine is shared
    model = tiny_model(args.family).eval()
    t0 = time.perf_counter()
    totals = {"requests": 0, "chunked": 0, "preempted": 0, "layouts": 0}
    failed = []
    for seed in range(args.first_seed, args.first_seed + args.schedules):
        bad, stats = check(model, seed)
        for k in totals:
            totals[k] += int(stats[k])
        if bad:
            failed.append((seed, bad))
            print(f"schedule {seed}: requests {bad} differ from their solo reference")
    print(f"{args.family}: {args.schedules} schedules, {totals['requests']} requests ({totals['chunked']} with a "
          f"chunked prompt, {totals['preempted']} preempted, {totals['layouts']} schedules on per-slot layouts): "
          f"{args.schedules - len(failed)} schedules equal to the solo reference in every request, "
          f"{len(failed)} not; {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
