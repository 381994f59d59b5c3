"""Decode step under scope="sequence": every sequence its own R ∪ C and its own selection, ``pop::decode_seq``.

    keep_b = R_b ∪ top_{n_select}(C_b by |h[b, C_b]| · ||Wd[:, C_b]||)
    y[b]   = Σ_{j ∈ keep_b} h[b, j] · Wd[:, j]  (+ bias)

Per-sequence compact copies of the weights would multiply FFN memory by the batch (a 1B model at
batch 8 does not fit in 24 GB), so under this scope the gate/up projections stay dense over all
channels (one GEMM for the whole batch reads each weight once) and only the selection and the down
projection are per sequence:

* CPU (``decode_seq_reference``, traced by Inductor): the unselected channels are zeroed and one dense
  down GEMM serves the batch — at batch > 1 that is the fastest correct path: per-sequence gathers
  would read B partial copies of Wd instead of one whole one;
* CUDA (``_seq_down_kernel``): one program per (sequence, BLOCK_N columns) reads only that sequence's
  n_keep columns of Wd, so the down projection costs n_keep/d_ff of dense per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.partition import candidate_topk

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from pop_fx.ops.layout import CONV1D  # Conv1D stores Wd as [d_ff, d_out]


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


def decode_seq_reference(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
                         n_select: int, flags: int) -> Tensor:
    lead = h.shape[:-1]
    B = h.shape[0]
    h2 = h.reshape(B, h.shape[-1])  # one token per sequence
    keep = keep_indices(h2, wd_norm, rc_idx, n_R, n_select)
    mask = torch.zeros_like(h2).scatter_(1, keep, 1.0)
    y = _down(h2 * mask, wd, bd, flags)
    return y.reshape(*lead, y.shape[-1])


if triton is not None:

    @triton.jit
    def _seq_down_kernel(h_ptr, w_ptr, keep_ptr, y_ptr, N, n_keep, stride_hb, stride_keep, stride_wk, stride_wn,
                         stride_yb, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, n_keep, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n_keep
            ch = tl.load(keep_ptr + b * stride_keep + ks, mask=kmask, other=0)
            hv = tl.load(h_ptr + b * stride_hb + ch, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ch[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(hv[:, None] * w, axis=0)
        tl.store(y_ptr + b * stride_yb + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def decode_seq_triton(h2: Tensor, wd: Tensor, keep: Tensor, flags: int, launch=None) -> Tensor:
    """Per-sequence gathered down projection; ``wd`` as stored by the model ([d_out, d_ff], or [d_ff, d_out])."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    h2, keep = h2.contiguous(), keep.contiguous()
    B = h2.shape[0]
    if flags & CONV1D:
        N, stride_wk, stride_wn = wd.shape[1], wd.stride(0), wd.stride(1)
    else:
        N, stride_wk, stride_wn = wd.shape[0], wd.stride(1), wd.stride(0)
    y = torch.empty(B, N, dtype=h2.dtype, device=h2.device)
    BLOCK_N, BLOCK_K = 128, 32  # as in decode_down: a 16 KB fp32 tile per program
    kernel = launch(_seq_down_kernel) if launch is not None else _seq_down_kernel
    kernel[(B, triton.cdiv(N, BLOCK_N))](h2, wd, keep, y, N, keep.shape[1], h2.stride(0), keep.stride(0),
                                         stride_wk, stride_wn, y.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


@torch.library.triton_op("pop::decode_seq", mutates_args=())
def decode_seq(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int,
               flags: int) -> Tensor:
    if h.device.type != "cuda" or triton is None:
        return decode_seq_reference(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags)
    lead = h.shape[:-1]
    h2 = h.reshape(h.shape[0], h.shape[-1])
    keep = keep_indices(h2, wd_norm, rc_idx, n_R, n_select)
    y = decode_seq_triton(h2, wd, keep, flags, launch=torch.library.wrap_triton)
    if bd is not None:
        y = y + bd
    return y.reshape(*lead, y.shape[-1])
