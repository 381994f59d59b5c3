"""One decode pass over windows: prefill the prompts, then one continuation token per step through the KV cache."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RowOutputs:
    nll: torch.Tensor
    """[N, T] float64: -log p(continuation token) (teacher rows; meaningless on greedy rows)"""
    pred: torch.Tensor
    """[N, T] int64: each step's argmax (on greedy rows: the generated tokens)"""
    logits: torch.Tensor | None = None
    """[N, T, V] float32, only when asked for (the backend agreement check)"""


def forward_kwargs(model: Any) -> dict[str, Any]:
    """Only the last position's logits are read: skip the others where the model allows it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        return set()


def _cache_io(model: Any) -> tuple[str, Any]:
    """How to hand the KV cache back to the model, and how to read it from an output.

    transformers 5.2x renamed the argument ``cache`` (``past_key_values`` is deprecated).
    """
    name = "cache" if "cache" in _forward_params(model) else "past_key_values"

    def get(out):
        c = out.get("cache") if hasattr(out, "get") else None
        return c if c is not None else out.past_key_values

    return name, get


@torch.no_grad()
def decode_rows(
    model: Any,
    prompts: torch.Tensor,
    conts: torch.Tensor,
    teacher: torch.Tensor,
    *,
    keep_logits: bool = False,
    on_step: Any = None,
    forward: Any = None,
) -> RowOutputs:
    """Prefill ``prompts`` [N, P], then T one-token decode steps through the KV cache.

    Row i is fed the continuation ``conts[i]`` (teacher forcing) where
    ``teacher[i]``, else its own previous argmax (greedy generation). Step t's
    logits predict continuation token t: the prefill's last position predicts
    token 0, so T forwards cover T tokens. ``forward`` replaces ``model`` as the
    callable (a compiled model); ``model`` is only read for its signature.
    """
    fwd = forward if forward is not None else model
    extra = forward_kwargs(model)
    cache_name, get_cache = _cache_io(model)
    n, T = conts.shape
    device = device_of(model)
    prompts, conts, teacher = prompts.to(device), conts.to(device), teacher.to(device)
    nll = torch.zeros(n, T, dtype=torch.float64)
    pred = torch.zeros(n, T, dtype=torch.long)
    kept = [] if keep_logits else None
    out = fwd(input_ids=prompts, use_cache=True, **extra)
    for step in range(T):
        logits = out.logits[:, -1].float()
        logp = logits.log_softmax(-1)
        nll[:, step] = -logp.gather(1, conts[:, step : step + 1]).squeeze(1).double().cpu()
        arg = logits.argmax(-1)
        pred[:, step] = arg.cpu()
        if kept is not None:
            kept.append(logits.cpu())
        if on_step is not None:
            on_step()
        if step == T - 1:
            break
        nxt = torch.where(teacher, conts[:, step], arg)
        out = fwd(input_ids=nxt[:, None], use_cache=True, **{cache_name: get_cache(out)}, **extra)
    return RowOutputs(nll, pred, torch.stack(kept, 1) if kept is not None else None)


def device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
