"""The ``pop::`` custom ops that the graph rewrite inserts, each with its fake beside it.

A site's state (see ``pop_fx.state``) enters the graphs as explicit tensors:

* ``rc_idx`` [S, n_R + n_C] int64 — R then C, each in ascending channel order
  (S = 1 under scope="batch", max_batch_size under scope="sequence");
* ``wd_norm_c`` [S, n_C] fp32 — ||Wd[:, j]|| of the candidates, for per-step scoring;
* ``w_in`` / ``b_in`` — the gate/up (or up) rows of R ∪ C laid out contiguously,
  [n_in·(n_R+n_C), d_model] and its bias ("batch" scope; empty under "sequence");
* ``wd_t`` [n_R+n_C, d_out] — the down projection's columns of R ∪ C, channel-major,
  so a decode step's down projection reads contiguous rows ("batch" scope).

The prefill op writes all of them in place; decode ops only read them. The
user's Parameters are never modified. Every op calls ``pop_fx.partition`` for
ranks and selection, like the eager reference does.

Layout flags (``flags`` argument, a bit set):
  FUSED  — ``w_a`` holds gate rows [0, d_ff) and up rows [d_ff, 2·d_ff) (Phi-3's gate_up_proj);
  CONV1D — weights are stored [in, out] (GPT-2's Conv1D) instead of [out, in].
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx import partition as P
from pop_fx.kernels.layout import CONV1D, FUSED, _rows, write_partition  # noqa: F401  (flags and layout, shared)


def _down(h: Tensor, wd: Tensor, bd: Tensor | None, flags: int) -> Tensor:
    """The site's own down projection, computed as the model computes it (linear, or addmm for Conv1D)."""
    if flags & CONV1D:
        out = torch.addmm(bd, h.reshape(-1, h.shape[-1]), wd) if bd is not None else h.reshape(-1, h.shape[-1]) @ wd
        return out.reshape(*h.shape[:-1], wd.shape[1])
    return torch.nn.functional.linear(h, wd, bd)


def _d_out(wd: Tensor, flags: int) -> int:
    return wd.shape[1] if flags & CONV1D else wd.shape[0]


# --------------------------------------------------------------------------------------------
# prefill: importance, partition into state, layouts, FFN output per config.prefill
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "pop::prefill",
    mutates_args=("rc_idx", "wd_norm_c", "w_in", "b_in", "wd_t"),
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
    wd_t: Tensor,
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
    token_mask = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == B and h.dim() == 3:
        token_mask = attention_mask[:, -L:]
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    scores = P.importance(h, wd_norm, token_mask, per_sequence=per_sequence)  # [d_ff] or [B, d_ff]
    if per_sequence and B > rc_idx.shape[0]:
        raise ValueError(
            f"batch size {B} exceeds PopConfig.max_batch_size={rc_idx.shape[0]} (scope='sequence'): "
            "compile with a larger max_batch_size"
        )
    write_partition(scores, sizes, wd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_t, flags)
    if not pruned_prefill:
        return _down(h, wd, bd, flags)
    keep = P.keep_set(scores, sizes)
    mask = torch.zeros(scores.shape, dtype=h.dtype, device=h.device).scatter_(-1, keep, 1)
    if per_sequence:
        mask = mask.reshape(B, *([1] * (h.dim() - 2)), d_ff)
    return _down(h * mask, wd, bd, flags)


@prefill.register_fake
def _(h, attention_mask, wd, bd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_t,
      n_keep, n_R, n_C, flags, per_sequence, pruned_prefill):
    return h.new_empty(*h.shape[:-1], _d_out(wd, flags))


# --------------------------------------------------------------------------------------------
# decode ops live with their kernels (pop_fx/kernels/): importing them registers pop::decode, pop::decode_seq
# --------------------------------------------------------------------------------------------

from pop_fx.kernels.decode_down import decode, decode_down_reference  # noqa: E402
from pop_fx.kernels.decode_seq import decode_seq, decode_seq_reference  # noqa: E402
from pop_fx.kernels.proxy import decode_sel, gather_in, proxy_select  # noqa: E402

__all__ = ["FUSED", "CONV1D", "prefill", "decode", "decode_down_reference", "decode_seq", "decode_seq_reference", "proxy_select", "gather_in", "decode_sel",
           "write_partition"]
