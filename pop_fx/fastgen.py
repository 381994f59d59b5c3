"""A greedy decode loop leaner than ``generate()``: what ``generate(do_sample=False)`` computes for unpadded prompts.

    tokens = pop_fx.greedy(model, input_ids, max_new_tokens=64)            # [batch, max_new_tokens] (eos: stops early)
    tokens, stamps = pop_fx.greedy(model, input_ids, 64, stamps=True)      # + perf_counter() of each new token

One forward for the prompt, then one per new token with ``logits_to_keep=1`` and an argmax, over a ``DynamicCache``
(default) or a ``StaticCache`` (``static=True``). It leaves out ``generate()``'s per-step work — input preparation,
the attention mask grown every step, the fp32 copy of the logits, the logits processors, the stopping criteria —
which costs a small model's decode step several milliseconds on a CPU (docs/decode_speed.md measures it). It is
greedy only and takes no attention mask: a batch of prompts of one length, no padding. A ``pop_fx.compile``d model
starts from a fresh partition, as its ``generate()`` does. ``generate()`` stays the general path.
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def greedy(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, static: bool = False,
           eos_token_id: int | None = None, stamps: bool = False):
    """The greedy continuation of ``input_ids [batch, n]`` (no padding): ``[batch, m]`` new tokens, m ≤
    ``max_new_tokens`` (fewer only when every row has produced ``eos_token_id``; a finished row repeats eos). With
    ``stamps``, also a list of ``time.perf_counter()`` at each new token."""
    from transformers import DynamicCache, StaticCache

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids of shape {tuple(getattr(input_ids, 'shape', ()))} is invalid: allowed a "
                         "[batch, length] tensor of token ids, length >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: allowed an int >= 1")
    if "_pop_config" in vars(model):
        from pop_fx.api import reset

        reset(model)
    cfg = model.config
    n = input_ids.shape[1]
    cache = (StaticCache(config=cfg, max_cache_len=n + max_new_tokens) if static else DynamicCache(config=cfg))
    key = _cache_kwarg(model)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{key: cache})
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks, t = [tok], [time.perf_counter()]
    done = None if eos_token_id is None else tok[:, 0] == eos_token_id
    for _ in range(max_new_tokens - 1):
        if done is not None and bool(done.all()):
            break
        with torch.profiler.record_function("pop_fx.greedy.step"):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{key: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        if done is not None:
            tok = torch.where(done[:, None], torch.full_like(tok, eos_token_id), tok)
            done = done | (tok[:, 0] == eos_token_id)
        toks.append(tok)
        if stamps:
            t.append(time.perf_counter())
    ids = torch.cat(toks, 1)
    return (ids, t) if stamps else ids


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` in transformers ≥ 5.2x, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


__all__ = ["greedy"]
