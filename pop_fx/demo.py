"""Dense vs POP greedy generation on SmolLM2, with next-token agreement and speed."""

from __future__ import annotations

import argparse
import json
import time

import torch

DEFAULT_PROMPTS = ("The capital of France is", "In the beginning God created")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS), help="prompts (default: two built-in ones)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per prompt (default %(default)s)")


def _generate(model, tok, prompt: str, n: int) -> tuple[torch.Tensor, float]:
    ids = tok(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0], n / (time.perf_counter() - t0)


def pop_context(model, config):
    """How POP is applied in the demo (the eager reference for now)."""
    from . import reference

    return reference.pruned(model, config)


def run(args: argparse.Namespace) -> int:
    from .agreement import next_token_agreement
    from .cli import config_from_args
    from .models import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 1")
    config = config_from_args(args)
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        raise ValueError(f"--model={args.model!r} has no tokenizer: allowed 'smollm2' or a folder with a tokenizer")
    rows = []
    for prompt in args.prompts:
        dense_ids, dense_tps = _generate(model, tok, prompt, args.max_new_tokens)
        with pop_context(model, config):
            pop_ids, pop_tps = _generate(model, tok, prompt, args.max_new_tokens)
        n_prompt = len(tok(prompt).input_ids)
        # Teacher-forced on the dense continuation, every step through POP's decode path.
        agree = next_token_agreement(model, dense_ids[None, :-1], n_prompt, lambda: pop_context(model, config))
        rows.append(dict(
            prompt=prompt,
            dense=tok.decode(dense_ids[n_prompt:], skip_special_tokens=True),
            pop=tok.decode(pop_ids[n_prompt:], skip_special_tokens=True),
            agreement=agree, dense_tokens_per_s=dense_tps, pop_tokens_per_s=pop_tps,
        ))
    if args.json:
        print(json.dumps({"config": config.as_dict(), "model": args.model, "results": rows}, indent=2))
        return 0
    print(f"model {args.model}  sparsity {config.sparsity}  candidate_ratio {config.candidate_ratio}  (eager reference)")
    for r in rows:
        print(f"\nprompt: {r['prompt']!r}")
        print(f"  dense: {r['dense']!r}   [{r['dense_tokens_per_s']:.1f} tok/s]")
        print(f"  POP  : {r['pop']!r}   [{r['pop_tokens_per_s']:.1f} tok/s]")
        print(f"  next-token agreement (decode mode, teacher-forced on dense): {r['agreement']:.3f}")
    return 0
