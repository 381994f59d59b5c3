"""Time to first token, dense Inductor vs POP, on the real SmolLM2, side by side in one process.

    python examples/ttft.py                          # prompts of 16 and 512 tokens, fp32, 5 interleaved rounds
    python examples/ttft.py --prompt-tokens 16 512 1024 --dtype bfloat16

TTFT is the wall time of ``generate(max_new_tokens=1)`` on a compiled model (compilation excluded: every
prompt length is warmed up first): the prefill forward, plus for POP the partition and the R ∪ C layout copy
of every FFN. Both models are compiled the same way (Inductor, default mode); the rounds alternate between
them so a busy machine slows both alike. Prints one line per prompt length and the ratio POP / dense.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def prompt_ids(tok, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the packaged text (real prose, not repeated tokens)."""
    from pop_fx.tools.evaluation.text import default_text_path

    text = default_text_path().read_text(encoding="utf-8")[: 64 * n]
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"--prompt-tokens {n}: the text has only {ids.shape[1]} tokens")
    return ids


def ttft(model, ids: torch.Tensor, new_tokens: int = 1) -> float:
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import pop_fx
    from pop_fx.tools.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 512])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--candidate-ratio", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: allowed an integer >= 1")

    dense, tok = load_model(args.model, args.dtype)
    pop, _ = load_model(args.model, args.dtype)
    dense.compile(backend="inductor")
    pop_fx.compile(pop, sparsity=args.sparsity, candidate_ratio=args.candidate_ratio)
    models = {"dense-inductor": dense, "pop": pop}
    prompts = {n: prompt_ids(tok, n) for n in args.prompt_tokens}
    with torch.no_grad():
        for ids in prompts.values():  # compile every prompt length (a second length recompiles with symbolic sizes)
            for m in models.values():  # and the decode graph, so that the report can show every site rewritten
                for _ in range(2):
                    ttft(m, ids, new_tokens=2)
        rep = pop_fx.report(pop)
        if not rep.sites or rep.warnings:
            print(f"pop-fx ttft: POP did not rewrite every site ({rep.warnings}); not timed", file=sys.stderr)
            return 1
        times = {(n, v): [] for n in prompts for v in models}
        for _ in range(args.rounds):
            for n, ids in prompts.items():
                for v, m in models.items():
                    times[n, v].append(ttft(m, ids))
    print(f"# {args.model} {args.dtype}, batch 1, r={args.sparsity} gamma={args.candidate_ratio}, "
          f"median of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'prompt tokens':>13}  {'dense TTFT s':>12}  {'POP TTFT s':>10}  {'POP / dense':>11}")
    for n in prompts:
        d, q = (statistics.median(times[n, v]) for v in models)
        print(f"{n:>13}  {d:>12.3f}  {q:>10.3f}  {q / d:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
