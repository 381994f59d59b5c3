"""Dense vs POP greedy generation on SmolLM2 through torch.compile, with token agreement and speed.

Dense runs under stock Inductor, POP under ``backend="pop"`` (both compiled in place, warmed up
once, then timed), so tokens/s compares like with like; ``--no-compile`` shows the eager reference.
"""

from __future__ import annotations

import argparse
import json

import torch

DEFAULT_PROMPTS = ("The capital of France is", "In the beginning God created")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS), help="prompts (default: two built-in ones)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per prompt (default %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="run POP through the eager reference instead of backend='pop'")


def _generate(model, tok, prompt: str, n: int, warmup: bool = False) -> tuple[torch.Tensor, float]:
    """(ids, decode tokens/s): the rate between the first and the last new token (prefill excluded, as in
    ``pop-fx bench``; POP's prefill also builds its layouts)."""
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if warmup:  # compile the prefill and decode graphs outside the timed run
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        stamps = StepStamps()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]))
    return out[0], stamps.decode_rate()


def _compiled_runs(model, tok, prompts, n, config):
    """(dense ids, dense tok/s), (POP ids, POP tok/s) per prompt: stock Inductor vs backend="pop"."""
    import pop_fx

    torch._dynamo.reset()
    model.compile(backend="inductor")
    dense = [_generate(model, tok, p, n, warmup=True) for p in prompts]
    pop_fx.decompile(model)
    torch._dynamo.reset()
    pop_fx.compile(model, config)
    try:
        pop = [_generate(model, tok, p, n, warmup=True) for p in prompts]
        report = pop_fx.report(model)
    finally:
        pop_fx.decompile(model)
    return dense, pop, report


def pop_context(model, config):
    """How POP is applied in the demo (the eager reference for now)."""
    from pop_fx import reference

    return reference.pruned(model, config)


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.agreement import next_token_agreement
    from pop_fx.tools.cli import config_from_args
    from pop_fx.tools.models import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 1")
    config = config_from_args(args)
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        raise ValueError(f"--model={args.model!r} has no tokenizer: allowed 'smollm2' or a folder with a tokenizer")
    rows = []
    report = None
    if not args.no_compile:
        dense_runs, pop_runs, report = _compiled_runs(model, tok, args.prompts, args.max_new_tokens, config)
    for i, prompt in enumerate(args.prompts):
        if args.no_compile:
            dense_ids, dense_tps = _generate(model, tok, prompt, args.max_new_tokens)
            with pop_context(model, config):
                pop_ids, pop_tps = _generate(model, tok, prompt, args.max_new_tokens)
        else:
            (dense_ids, dense_tps), (pop_ids, pop_tps) = dense_runs[i], pop_runs[i]
        n_prompt = len(tok(prompt).input_ids)
        same = (dense_ids[n_prompt:] == pop_ids[n_prompt:]).float().mean().item()
        # Teacher-forced on the dense continuation, every step through POP's decode path.
        agree = next_token_agreement(model, dense_ids[None, :-1], n_prompt, lambda: pop_context(model, config))
        rows.append(dict(
            prompt=prompt,
            dense=tok.decode(dense_ids[n_prompt:], skip_special_tokens=True),
            pop=tok.decode(pop_ids[n_prompt:], skip_special_tokens=True),
            agreement=agree, greedy_tokens_equal=same, dense_tokens_per_s=dense_tps, pop_tokens_per_s=pop_tps,
        ))
    if args.json:
        print(json.dumps({"config": config.as_dict(), "model": args.model, "compiled": not args.no_compile,
                          "sites": report.counts() if report else None, "results": rows}, indent=2))
        return 0
    how = "eager reference" if args.no_compile else "dense: stock Inductor, POP: backend='pop' (Inductor)"
    print(f"model {args.model}  sparsity {config.sparsity}  candidate_ratio {config.candidate_ratio}  ({how})")
    if report is not None:
        print(f"POP sites: {report.counts()}  layout buffers {report.extra_bytes / 2**20:.1f} MiB")
    for r in rows:
        print(f"\nprompt: {r['prompt']!r}")
        print(f"  dense: {r['dense']!r}   [{r['dense_tokens_per_s']:.1f} decode tok/s]")
        print(f"  POP  : {r['pop']!r}   [{r['pop_tokens_per_s']:.1f} decode tok/s]")
        print(f"  greedy tokens equal to dense: {r['greedy_tokens_equal']:.3f}   "
              f"speed POP/dense: {r['pop_tokens_per_s'] / r['dense_tokens_per_s']:.2f}x")
        print(f"  next-token agreement (decode mode, teacher-forced on dense): {r['agreement']:.3f}")
    return 0
