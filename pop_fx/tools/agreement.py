"""Decode-mode next-token agreement: how often a pruned model predicts what the dense one does.

Teacher forcing in decode mode: prefill the first ``prompt_len`` tokens, then
feed the rest of the window one token per step through the cache, exactly as
``generate`` would, and take the argmax after every step. Both models see the
same (dense-text) tokens, so one early disagreement cannot snowball into the
rest of the window; every step still runs POP's decode path (candidate
re-selection), which a single teacher-forced forward would not.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, ContextManager

import torch
from torch import nn


@torch.no_grad()
def decode_logits(model: nn.Module, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits predicting tokens ``prompt_len .. T`` of ``input_ids`` [B, T]: shape [B, T - prompt_len + 1, V].

    Position 0 comes from the prefill (it predicts the first continuation token),
    each later one from a one-token decode step.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    T = input_ids.shape[1]
    if not 1 <= prompt_len <= T:
        raise ValueError(f"prompt_len={prompt_len!r} is invalid: allowed 1 <= prompt_len <= {T} (the window length)")
    # transformers 5.2x renamed the forward's cache argument to "cache"; older releases call it past_key_values.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids[:, :prompt_len], use_cache=True)
    cache = out.past_key_values
    logits = [out.logits[:, -1:].float()]
    for t in range(prompt_len, T):
        out = model(input_ids=input_ids[:, t : t + 1], use_cache=True, **{cache_arg: cache})
        cache = out.past_key_values
        logits.append(out.logits[:, -1:].float())
    return torch.cat(logits, dim=1)


def next_token_agreement(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_len: int,
    context: Callable[[], ContextManager] | None = None,
    dense_argmax: torch.Tensor | None = None,
) -> float:
    """Fraction of decode positions where argmax under ``context()`` equals the dense argmax.

    ``context`` builds the pruning context, e.g. ``lambda: reference.pruned(model, cfg)``;
    pass ``dense_argmax`` (from ``decode_logits(...).argmax(-1)``) to reuse one dense run
    across several configurations.
    """
    if dense_argmax is None:
        dense_argmax = decode_logits(model, input_ids, prompt_len).argmax(-1)
    with (context() if context is not None else contextlib.nullcontext()):
        pruned_argmax = decode_logits(model, input_ids, prompt_len).argmax(-1)
    return (pruned_argmax == dense_argmax).float().mean().item()


__all__ = ["decode_logits", "next_token_agreement"]
