"""Measuring a frontier: each setting's decode-mode quality (the eager reference, through the evaluation
harness) and its compiled decode speed (dense and every setting compiled once, timed in interleaved rounds)."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from pop_fx.tools.frontier.cache import Cache, quality_source_hash
from pop_fx.tools.frontier.settings import DENSE, Setting

SPEED_PROMPT = "In the beginning, God created the heavens and the earth. The earth was formless and empty."


@contextlib.contextmanager
def pruned_forward(model, config):
    """The eager reference around ``model``, yielding the forward (as the harness's runners do)."""
    from pop_fx.reference import pruned

    with pruned(model, config):
        yield model


@torch.no_grad()
def measure_quality(model, tokenizer, text: str, settings: Sequence[Setting], *, n_windows: int, prompt_len: int,
                    cont_len: int, batch_size: int, prefill: str = "pruned", cache: Cache | None = None,
                    on_cell: Callable[[Setting, bool], None] | None = None) -> dict[Setting, dict[str, float]]:
    """Decode-mode perplexity, top-1 and agreement with dense per setting, through the eager reference."""
    from pop_fx.tools.evaluation.harness import RowPlan, run_rows
    from pop_fx.tools.evaluation.results import metrics
    from pop_fx.tools.evaluation.text import make_windows

    evals, _, _ = make_windows(tokenizer, text, n_windows=n_windows, length=prompt_len + cont_len)
    ids = torch.tensor([w.token_ids for w in evals], dtype=torch.long)
    prompts, conts = ids[:, :prompt_len], ids[:, prompt_len:]
    plan = RowPlan(n_windows, 0, batch_size)
    scope = "sequence" if batch_size > 1 else "batch"  # each window its own partition
    out: dict[Setting, dict[str, float]] = {}
    dense_ref = None
    for s in settings:
        key = ("quality", s, prefill, quality_source_hash())
        hit = cache.get(key) if cache is not None else None
        if hit is not None and (s != DENSE or "pred" in hit):
            out[s] = hit
            if s == DENSE:
                dense_ref = (torch.tensor(hit["pred"]), torch.zeros(0, cont_len, dtype=torch.long))
            if on_cell:
                on_cell(s, True)
            continue
        ctx = contextlib.nullcontext(model) if s == DENSE else pruned_forward(model, s.config(scope=scope, prefill=prefill))
        rows, _ = run_rows(model, ctx, plan, prompts, conts)
        teacher, greedy = plan.split(rows)
        if s == DENSE:
            dense_ref = (teacher.pred, greedy)
        m = metrics(teacher, greedy, conts, dense_ref)
        res = {k: m[k] for k in ("perplexity", "top1", "agreement")}
        if s == DENSE:
            res["pred"] = teacher.pred.tolist()  # the reference the other settings' agreement is taken against
        out[s] = res
        if cache is not None:
            cache.put(key, res)
        if on_cell:
            on_cell(s, False)
    return out


DENSE_BASELINE = "pop_fx.compile(sparsity=0)"
"""how the dense row is compiled (part of the speed cache key: rows timed against stock Inductor are not reused)"""


@torch.no_grad()
def measure_speed(model, tokenizer, settings: Sequence[Setting], *, new_tokens: int, rounds: int,
                  lowering: str = "inductor", on_step: Callable[[str], None] | None = None) -> dict[Setting, dict[str, Any]]:
    """Decode tokens/s per setting, every one under pop_fx.compile — dense as ``sparsity=0``, so it gets the same
    autotuned linears and compile settings as POP (stock Inductor's GEMV decodes SmolLM2 about 2x slower, and a
    ratio against it would credit POP with pop-fx's lowering) — each compiled once and then timed in interleaved
    rounds (so the machine's noise falls on all of them alike).

    ``lowering="eager"`` (tests) runs every setting with ``lowering="eager"``: seconds to compile, speeds that are
    not Inductor's."""
    import pop_fx
    from pop_fx.api import recompile_limit_hits
    from transformers import LogitsProcessorList

    from pop_fx.tools.model_copies import require_fully_rewritten, shallow_copy
    from pop_fx.tools.timing import StepStamps

    device = next(model.parameters()).device
    if tokenizer is not None and not hasattr(tokenizer, "pad_token_id"):  # the byte tokenizer of tiny models
        ids = torch.tensor([tokenizer(SPEED_PROMPT)["input_ids"][:24]])
    elif tokenizer is not None:
        ids = tokenizer(SPEED_PROMPT, return_tensors="pt").input_ids
    else:
        ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              attention_mask=torch.ones_like(ids), pad_token_id=pad if pad is not None else 0)

    def gen(m) -> tuple[float, float]:
        stamps = StepStamps(sync=device.type == "cuda")
        t0 = time.perf_counter()
        m.generate(ids, logits_processor=LogitsProcessorList([stamps]), **kw)
        return stamps.t[0] - t0, stamps.decode_rate()

    # Every variant is a compiled copy of one model class: Dynamo's recompile limit counts all their graphs
    # against one code object, so each gets the default allowance (as in pop-fx bench).
    torch._dynamo.reset()
    hits = recompile_limit_hits()
    built: dict[Setting, Any] = {}
    res = {s: dict(samples=[], prefill_s=float("nan"), extra_mib=0.0) for s in settings}
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * (len(settings) + 1)):
        for s in settings:
            if on_step:
                on_step(f"compiling {s.label}")
            m = pop_fx.compile(shallow_copy(model), s.config(lowering=lowering))
            gen(m)  # compile the prefill and decode graphs of this length
            gen(m)
            if s != DENSE:
                require_fully_rewritten(s.label, m)
                res[s]["extra_mib"] = pop_fx.report(m).extra_bytes / 2**20
            built[s] = m
        for k in range(rounds):
            for s, m in built.items():
                if on_step:
                    on_step(f"timing round {k + 1}/{rounds}: {s.label}")
                prefill_s, rate = gen(m)
                res[s]["samples"].append(rate)
                res[s]["prefill_s"] = prefill_s
    if recompile_limit_hits() > hits:
        raise RuntimeError("pop-fx frontier: Dynamo's recompile limit was hit, so some setting ran uncompiled; "
                           "the timings are void (measure fewer settings per run)")
    for s in settings:
        built.pop(s, None)
    torch._dynamo.reset()
    return res


def median(xs: Sequence[float]) -> float:
    """The median of the finite samples (nan when there is none)."""
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


__all__ = ["DENSE_BASELINE", "SPEED_PROMPT", "measure_quality", "measure_speed", "median", "pruned_forward"]
