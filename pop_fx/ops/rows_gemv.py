"""Gathered row products ``x · w[rows]ᵀ (· s[rows])`` on CUDA: the Triton kernel shared by the proxy ops.

``pop::gather_in`` uses it for the exact gate/up rows of R and of the chosen candidates (``pop::proxy_select``
used it for the int8 copy's candidate rows until its fused scoring kernel, ``proxy_kernels.py``, replaced it;
the scaled int8 mode stays, tested, as the examples' baseline for that kernel). One program per BLOCK_R gathered rows of one batch
row streams those rows, so no gathered copy of a weight is materialized. The torch references are the ops'
CPU bodies; tests compare the two under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # triton is a Linux-only dependency; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _rows_gemv_kernel(x_ptr, w_ptr, s_ptr, rows_ptr, y_ptr, n_rows, K, stride_xb, stride_w, stride_yb,
                          HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[b, i] = Σ_k x[b, k] · w[rows[i], k] (· s[rows[i]]): BLOCK_R gathered rows of one batch row.
        b = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < n_rows
        rows = tl.load(rows_ptr + r, mask=rmask, other=0)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            x = tl.load(x_ptr + b * stride_xb + ks, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0)
        tl.store(y_ptr + b * stride_yb + r, acc.to(y_ptr.dtype.element_ty), mask=rmask)


def rows_gemv_triton(x2: Tensor, w: Tensor, rows: Tensor, s: Tensor | None = None, out_dtype=None,
                     launch=None) -> Tensor:
    """x2 [B, K] · w[rows]ᵀ (· s[rows]) -> [B, |rows|] with ``_rows_gemv_kernel``; ``launch`` wraps it."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    x2, w, rows = x2.contiguous(), w.contiguous(), rows.contiguous()
    B, K = x2.shape
    y = torch.empty(B, rows.numel(), dtype=out_dtype or x2.dtype, device=x2.device)
    # BLOCK_R 32 rows × BLOCK_K 128: a [32, 128] fp32 tile, 16 KB of registers per program; 128 contiguous
    # elements of one row per load (512 B fp32, 128 B int8).
    BLOCK_R, BLOCK_K = 32, 128
    kernel = launch(_rows_gemv_kernel) if launch is not None else _rows_gemv_kernel
    grid = (B, triton.cdiv(rows.numel(), BLOCK_R))
    kernel[grid](x2, w, s if s is not None else w, rows, y, rows.numel(), K, x2.stride(0), w.stride(0), y.stride(0),
                 HAS_SCALE=s is not None, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return y


def on_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda" and triton is not None


__all__ = ["on_cuda", "rows_gemv_triton"]
