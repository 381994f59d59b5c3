"""``pop::prefill``: importance, the partition into the site's state, the layouts, and the FFN's output.

    y = pop.prefill(H, attention_mask, Wd, bd, W_up…, b_up…, state…)     # was: down(H)

H is the prefill tokens' intermediate activation (gate/up stay dense). The op scores every channel
(Eq. 3, padding excluded), splits R/C/P, writes ``rc_idx``/``wd_norm_c`` and the R ∪ C layouts in place
(``pop_fx.ops.layout``), and returns the down projection under the kept channels (the paper) or dense
(``prefill="dense"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx import partition as P
from pop_fx.ops.layout import CONV1D, gather_columns, write_partition


def _down(h: Tensor, wd: Tensor, bd: Tensor | None, flags: int) -> Tensor:
    """The site's own down projection, computed as the model computes it (linear, or addmm for Conv1D)."""
    if flags & CONV1D:
        out = torch.addmm(bd, h.reshape(-1, h.shape[-1]), wd) if bd is not None else h.reshape(-1, h.shape[-1]) @ wd
        return out.reshape(*h.shape[:-1], wd.shape[1])
    return torch.nn.functional.linear(h, wd, bd)


GATHER_MIN_TOKENS = 64
"""From this many prefill tokens on, the pruned prefill gathers the kept channels of H and of Wd and projects
them (cheaper than masking H, whose pass grows with the tokens); below it, the copy of Wd's kept columns would
cost more than the mask."""


def _d_out(wd: Tensor, flags: int) -> int:
    return wd.shape[1] if flags & CONV1D else wd.shape[0]


@torch.library.custom_op(
    "pop::prefill",
    mutates_args=("rc_idx", "wd_norm_c", "w_in", "b_in", "wd_rc"),
)
def prefill(
    h: Tensor,
    attention_mask: Tensor | None,
    wd: Tensor,
    bd: Tensor | None,
    w_a: Tensor,
    b_a: Tensor | None,
    w_b: Tensor | None,
    b_b: Tensor | None,
    wd_norm: Tensor,
    rc_idx: Tensor,
    wd_norm_c: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    wd_rc: Tensor,
    n_keep: int,
    n_R: int,
    n_C: int,
    flags: int,
    per_sequence: bool,
    pruned_prefill: bool,
) -> Tensor:
    """h: [B, L, d_ff] intermediate activation of the prefill tokens; returns the FFN output [B, L, d_out]."""
    d_ff = h.shape[-1]
    B, L = h.shape[0], h.shape[-2]
    token_mask = P.token_mask(attention_mask, B, L) if h.dim() == 3 else None
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    scores = P.importance(h, wd_norm, token_mask, per_sequence=per_sequence)  # [d_ff] or [B, d_ff]
    if per_sequence and B > rc_idx.shape[0]:
        raise ValueError(
            f"batch size {B} exceeds PopConfig.max_batch_size={rc_idx.shape[0]} (scope='sequence'): "
            "compile with a larger max_batch_size"
        )
    write_partition(scores, sizes, wd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_rc, flags)
    if not pruned_prefill:
        return _down(h, wd, bd, flags)
    keep = P.keep_set(scores, sizes)
    if not per_sequence and h.numel() // d_ff >= GATHER_MIN_TOKENS:
        # One kept set for the batch: project only the n_keep kept channels (a narrower matmul, ~(1 - r) of the
        # down projection's FLOPs) instead of multiplying H by a 0/1 mask and projecting every channel.
        if flags & CONV1D:
            wd_kept = wd.index_select(0, keep)
        else:
            wd_kept = wd.new_empty(wd.shape[0], keep.numel())
            gather_columns(wd, keep, wd_kept)
        return _down(h.index_select(-1, keep), wd_kept, bd, flags)
    mask = torch.zeros(scores.shape, dtype=h.dtype, device=h.device).scatter_(-1, keep, 1)
    if per_sequence:
        mask = mask.reshape(B, *([1] * (h.dim() - 2)), d_ff)
    return _down(h * mask, wd, bd, flags)


@prefill.register_fake
def _(h, attention_mask, wd, bd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_rc,
      n_keep, n_R, n_C, flags, per_sequence, pruned_prefill):
    return h.new_empty(*h.shape[:-1], _d_out(wd, flags))


__all__ = ["prefill"]
