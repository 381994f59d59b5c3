"""Decode-step down projection over R ∪ selected candidates: ``pop::decode``.

    y[b, :] = Σ_{j < n_R} h[b, j] · Wdᵀ[j, :]  +  Σ_{s ∈ S_t} h[b, n_R + s] · Wdᵀ[n_R + s, :]  (+ bias)
    S_t     = top_{n_select}( ||h[:, n_R + s]||_rows · ||Wd[:, C_s]|| )      (candidate scoring, one per step)

``h`` holds the step's activation over the R ∪ C layout (R first, then C) and ``wd_t`` the down
projection's R ∪ C columns stored channel-major ([n_R + n_C, d_out]), both written contiguously by
the prefill, so R is one contiguous GEMV and only the n_select selected candidate rows are gathered.

Three implementations, one contract:
* ``decode_down_reference`` — plain torch, the definition (and the CPU path: Inductor traces it into
  its graph, fusing the scoring into C++ and calling the GEMVs as extern mm; no Python per step);
* ``_down_kernel`` (Triton) — one program per BLOCK_N output columns streams the R rows and then the
  selected rows of ``wd_t``, so no gathered copy of the weights is ever materialized (CUDA path);
* ``pop::decode`` — a ``triton_op`` whose body branches on the device, so Inductor sees either the
  torch ops (CPU) or the Triton kernel (CUDA) inside its generated code.

Candidate top-k uses ``torch.topk`` on every device: n_C is a few hundred to a few thousand values,
where the vendor top-k is already one small launch (``pop_fx.partition.candidate_topk``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.partition import candidate_topk

try:  # triton is a Linux-only dependency; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def decode_down_reference(h_rc: Tensor, wd_t: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                          n_select: int) -> Tensor:
    lead = h_rc.shape[:-1]
    h2 = h_rc.reshape(-1, h_rc.shape[-1])
    if n_select > 0:
        # Zero the unselected candidates and run ONE GEMV over all R ∪ C rows: on a CPU that streams
        # n_R + n_C contiguous rows, less memory traffic than gathering the selected rows into a copy
        # (read + write + read again) and a second GEMV. (The Triton kernel gathers without a copy.)
        sel = candidate_topk(h2[:, n_R:], wd_norm_c, n_select)
        keep_c = torch.zeros(h2.shape[-1] - n_R, dtype=h2.dtype, device=h2.device).index_fill_(0, sel, 1)
        y = torch.cat([h2[:, :n_R], h2[:, n_R:] * keep_c], dim=-1) @ wd_t
    else:
        y = h2[:, :n_R] @ wd_t[:n_R]
    if bd is not None:
        y = y + bd
    return y.reshape(*lead, wd_t.shape[1])


if triton is not None:

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, sel_ptr, y_ptr, B, N, n_R, n_sel, stride_hb, stride_wk, stride_yb,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: BLOCK_N output columns of one row b. Weights are read once per row; at decode
        # B is 1..8, so re-reading per row is cheaper than a cross-row reduction.
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, n_R, BLOCK_K):  # R: contiguous rows
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n_R
            h = tl.load(h_ptr + b * stride_hb + ks, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(h[:, None] * w, axis=0)
        for k0 in range(0, n_sel, BLOCK_K):  # selected candidates: gathered rows
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n_sel
            rows = n_R + tl.load(sel_ptr + ks, mask=kmask, other=0)
            h = tl.load(h_ptr + b * stride_hb + rows, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wk + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(h[:, None] * w, axis=0)
        tl.store(y_ptr + b * stride_yb + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def decode_down_triton(h2: Tensor, wd_t: Tensor, sel: Tensor, n_R: int, launch=None) -> Tensor:
    """Launch ``_down_kernel`` on [B, n_R + n_C] activations; ``launch`` wraps the kernel (``wrap_triton``)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    h2 = h2.contiguous()
    wd_t = wd_t.contiguous()
    B, N = h2.shape[0], wd_t.shape[1]
    y = torch.empty(B, N, dtype=h2.dtype, device=h2.device)
    # BLOCK_N 128 / BLOCK_K 32: a [32, 128] fp32 tile is 16 KB of registers per program, and 128 columns of
    # a row-major weight row are one 512-byte coalesced read (fp32) — the access pattern of a GEMV.
    BLOCK_N, BLOCK_K = 128, 32
    kernel = launch(_down_kernel) if launch is not None else _down_kernel
    grid = (B, triton.cdiv(N, BLOCK_N))
    kernel[grid](h2, wd_t, sel, y, B, N, n_R, sel.numel(), h2.stride(0), wd_t.stride(0), y.stride(0),
                 BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


@torch.library.triton_op("pop::decode", mutates_args=())
def decode(h_rc: Tensor, wd_t: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int) -> Tensor:
    if h_rc.device.type != "cuda" or triton is None:
        return decode_down_reference(h_rc, wd_t, bd, wd_norm_c, n_R, n_select)
    lead = h_rc.shape[:-1]
    h2 = h_rc.reshape(-1, h_rc.shape[-1])
    sel = candidate_topk(h2[:, n_R:], wd_norm_c, n_select) if n_select > 0 else h2.new_zeros(0, dtype=torch.long)
    y = decode_down_triton(h2, wd_t, sel, n_R, launch=torch.library.wrap_triton)
    if bd is not None:
        y = y + bd
    return y.reshape(*lead, wd_t.shape[1])
