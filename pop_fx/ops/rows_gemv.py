"""Gathered row products ``x · w[rows]ᵀ (· s[rows])`` on CUDA: the Triton kernel shared by the proxy ops.

``pop::gather_in`` uses it for the exact gate/up rows of R and of the chosen candidates (``pop::proxy_select``
used it for the int8 copy's candidate rows until its fused scoring kernel, ``proxy_kernels.py``, replaced it;
the scaled int8 mode stays, tested, as the examples' baseline for that kernel). Grid (⌈|rows| / BLOCK_R⌉,
⌈B / BLOCK_B⌉): a program streams BLOCK_R gathered weight rows once, through a ``NUM_STAGES``-deep software
pipeline, for a whole block of up to BLOCK_B batch rows (``tl.dot`` with the batch padded to 16 rows, as the
split-K GEMV), so a decode batch of up to 16 reads each weight once and no gathered copy of a weight is
materialized. The torch references are the ops' CPU bodies; tests compare the two under ``TRITON_INTERPRET=1``
at batch 1, 3 and 8 and compile the kernel for sm_90.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops._triton import INTERPRET, on_cuda, tl, triton

# Tuning constants, each with its reason:
BLOCK_R = 32  # gathered rows a program: ~200 programs for the 1B shape's R ∪ chosen gate/up rows (2 per SM)
BLOCK_K = 128  # 128 contiguous elements of a row per load: 256 B bf16, 128 B int8 (whole sectors)
BLOCK_B = 16  # tl.dot's smallest M: batch rows that share one read of the weights
NUM_STAGES = 3  # tiles in flight a program before the first use (hides one HBM round trip)
# fp32 x: exact FMA products (no tensor cores) hold more registers: 64 columns (the same 256 bytes of an fp32 row)
# over 8 warps, where 128 over 4 spilled 8 bytes under Triton 3.6 (sm_90 test)
FP32_BLOCK_K, FP32_WARPS = 64, 8


def rows_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the rows GEMV for activations of ``dtype``."""
    return (FP32_BLOCK_K, FP32_WARPS) if dtype == torch.float32 else (BLOCK_K, 4)


if triton is not None:

    @triton.jit
    def _rows_gemv_kernel(x_ptr, w_ptr, s_ptr, rows_ptr, y_ptr, B, n_rows, K, stride_xb, stride_w, stride_yb,
                          HAS_SCALE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, IEEE: tl.constexpr):
        # y[b, i] = Σ_k x[b, k] · w[rows[i], k] (· s[rows[i]]) for BLOCK_R gathered rows and BLOCK_B batch rows
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        bs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = r < n_rows
        bmask = bs < B
        rows = tl.load(rows_ptr + r, mask=rmask, other=0)
        acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0, eviction_policy="evict_first")
            x = tl.load(x_ptr + bs[:, None] * stride_xb + ks[None, :], mask=bmask[:, None] & kmask[None, :],
                        other=0.0, eviction_policy="evict_last")
            if IEEE:  # fp32 x (or the interpreter, which multiplies 2-byte floats wrongly): exact fp32 products
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:  # bf16/fp16 x; int8 weights are exact in them
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0)[None, :]
        tl.store(y_ptr + bs[:, None] * stride_yb + r[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=bmask[:, None] & rmask[None, :])


def rows_gemv_grid(B: int, n_rows: int) -> tuple[int, int]:
    """(row blocks, batch blocks): every weight row is read once per BLOCK_B batch rows."""
    return triton.cdiv(n_rows, BLOCK_R), triton.cdiv(B, BLOCK_B)


def rows_gemv_triton(x2: Tensor, w: Tensor, rows: Tensor, s: Tensor | None = None, out_dtype=None,
                     launch=None) -> Tensor:
    """x2 [B, K] · w[rows]ᵀ (· s[rows]) -> [B, |rows|] with ``_rows_gemv_kernel``; ``launch`` wraps it."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    x2, rows = x2.contiguous(), rows.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    B, K = x2.shape
    y = torch.empty(B, rows.numel(), dtype=out_dtype or x2.dtype, device=x2.device)
    kernel = launch(_rows_gemv_kernel) if launch is not None else _rows_gemv_kernel
    block_k, warps = rows_tile(x2.dtype)
    kernel[rows_gemv_grid(B, rows.numel())](
        x2, w, s if s is not None else w, rows, y, B, rows.numel(), K, x2.stride(0), w.stride(0), y.stride(0),
        HAS_SCALE=s is not None, BLOCK_B=BLOCK_B, BLOCK_R=BLOCK_R, BLOCK_K=block_k, NUM_STAGES=NUM_STAGES,
        IEEE=x2.dtype == torch.float32 or INTERPRET, num_warps=warps)
    return y


__all__ = ["on_cuda", "rows_gemv_grid", "rows_gemv_triton", "rows_tile"]
