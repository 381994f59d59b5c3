"""``ragged_decode``: the down projection of a ragged serving step, each DECODE row pruned by its slot.

    keep_t = R_{slot[t]} ∪ top_{n_select}(C_{slot[t]} by |h[t, C]| · ||Wd[:, C]||)     (DECODE rows)
    keep_t = every channel                                                        (all other rows: dense)
    y[t]   = Wd · (h[t] ⊙ 1_{keep_t})  (+ bias)

Fixed shapes only (a gather of ``rc_idx[slot]``, a top-k, a scatter, one GEMM), so it can sit in a
CUDA-graph-captured decode batch; plain torch, so the compiled step fuses the scoring and the mask around the
GEMM (as an opaque custom op its ~12 eager ops cost ~0.3 ms per layer-step on SmolLM2, measured). No per-slot
weight copies: the original weights are read (on a GPU a gathered-row kernel, like Punica's BGMV for multi-LoRA,
would read only the union of the batch's kept rows; the torch body here computes the masked dense product, the
reference's exact math). Each row's selection
depends on its own h only, so requests cannot influence each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.ops.decode_seq import keep_indices
from pop_fx.serving.phases import DECODE


def keep_mask(h: Tensor, slot: Tensor, phase: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
              n_select: int) -> Tensor:
    """[T, d_ff] 0/1 in h's dtype: the channels each row computes (all of them for non-DECODE rows)."""
    keep = keep_indices(h, wd_norm, rc_idx[slot], n_R, n_select)
    mask = torch.zeros_like(h).scatter_(1, keep, 1.0)
    return torch.where((phase == DECODE)[:, None], mask, torch.ones((), dtype=h.dtype, device=h.device))


def ragged_decode(h: Tensor, slot: Tensor, phase: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor,
                  rc_idx: Tensor, n_R: int, n_select: int) -> Tensor:
    return F.linear(h * keep_mask(h, slot, phase, wd_norm, rc_idx, n_R, n_select), wd, bd)


__all__ = ["keep_mask", "ragged_decode"]
