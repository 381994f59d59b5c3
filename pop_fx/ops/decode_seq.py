"""Decode step under scope="sequence": every sequence its own R ∪ C and its own selection, ``pop::decode_seq``.

    keep_b = R_b ∪ top_{n_select}(C_b by |h[b, C_b]| · ||Wd[:, C_b]||)
    y[b]   = Wd · (h[b] ⊙ 1_{keep_b})  (+ bias)

Per-sequence compact copies of the weights would multiply FFN memory by the batch (a 1B model at
batch 8 does not fit in 24 GB), so under this scope the gate/up projections stay dense over all
channels (one GEMM for the whole batch reads each weight once) and only the selection and the down
projection are per sequence: the unselected channels of each row are zeroed and ONE dense down GEMM
serves the batch. That is the fastest correct path on both devices at batch > 1: per-sequence gathers
would read B partial copies of Wd instead of one whole one, and on a GPU a row-major [d_out, d_ff] weight
read at half its columns, scattered, touches nearly every sector anyway. What this scope saves over dense
is arithmetic, not bytes (README "Speed" says what it costs).

* ``decode_seq_reference`` — plain torch (the CPU path, traced by Inductor, and the CUDA default);
* ``kernels="triton"`` on CUDA — the same masked product through ``splitk_gemv``'s split-K GEMV (each
  weight read once for up to ``BLOCK_B`` rows, coalesced along d_ff; bias and cast in its finishing launch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops.layout import CONV1D  # Conv1D stores Wd as [d_ff, d_out]
from pop_fx.ops.decode import triton_serves
from pop_fx.ops.splitk_gemv import gemv_triton
from pop_fx.partition import candidate_topk


def keep_indices(h2: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int) -> Tensor:
    """[B, n_R + n_select] channel indices each sequence computes this step."""
    B = h2.shape[0]
    idx = rc_idx[:B]
    c_idx = idx[:, n_R:]
    if n_select == 0:
        return idx[:, :n_R]
    h_c = torch.gather(h2, 1, c_idx)
    sel = candidate_topk(h_c, wd_norm[c_idx], n_select, per_sequence=True)  # [B, n_select] positions in C_b
    return torch.cat([idx[:, :n_R], torch.gather(c_idx, 1, sel)], dim=1)


def _down(h2: Tensor, wd: Tensor, bd: Tensor | None, flags: int) -> Tensor:
    if flags & CONV1D:
        return torch.addmm(bd, h2, wd) if bd is not None else h2 @ wd
    return torch.nn.functional.linear(h2, wd, bd)


def _masked(h: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int) -> Tensor:
    B = h.shape[0]
    h2 = h.reshape(B, h.shape[-1])  # one token per sequence
    keep = keep_indices(h2, wd_norm, rc_idx, n_R, n_select)
    return h2 * torch.zeros_like(h2).scatter_(1, keep, 1.0)


def decode_seq_reference(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
                         n_select: int, flags: int) -> Tensor:
    y = _down(_masked(h, wd_norm, rc_idx, n_R, n_select), wd, bd, flags)
    return y.reshape(*h.shape[:-1], y.shape[-1])


@torch.library.triton_op("pop::decode_seq", mutates_args=())
def decode_seq(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int,
               flags: int, kernels: int = 0) -> Tensor:
    if kernels == 1 and not flags & CONV1D and triton_serves(h.reshape(h.shape[0], -1)):
        y = gemv_triton(_masked(h, wd_norm, rc_idx, n_R, n_select), wd, launch=torch.library.wrap_triton, bias=bd)
        return y.reshape(*h.shape[:-1], y.shape[-1])
    return decode_seq_reference(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags)


__all__ = ["decode_seq", "decode_seq_reference", "keep_indices"]
