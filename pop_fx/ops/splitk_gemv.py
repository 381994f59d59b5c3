"""Triton kernels of the CUDA decode path: candidate selection in one program, and a split-K GEMV.

Not ops: ``pop::decode`` and ``pop::decode_seq`` launch them when ``kernels="triton"`` (the CUDA default stays
the torch path — cuBLAS's GEMV over the masked activations — until a GPU run measures these faster; see
README "GPU"). Each has a torch reference the tests compare with under ``TRITON_INTERPRET=1`` and an
ahead-of-time sm_90 compile check (``tests/pop_fx/ops/test_triton_sm90.py``).

``_select_kernel`` — one program per step: scores the n_C candidates (||h[:, c]||_rows · ||Wd[:, c]||), turns
them into ``partition.rank_keys``'s int64 keys (monotone fp32 bits, ties by the lower index, NaN last), sorts
them (a bitonic ``tl.sort`` over next_pow2(n_C) ≤ 8192 keys, in registers) and writes the 0/1 mask of the
n_select best. It replaces ``torch.topk`` + a scatter (a radix select and a second launch) and keeps
docs/spec.md's tie-break exactly.

``_gemv_kernel`` — y = x · Wᵀ for W [N, K] in ``nn.Linear``'s layout and x [B ≤ 16, K]. Grid (N / BLOCK_N,
SPLIT): each program streams a [BLOCK_N, K / SPLIT] slab of W through a ``num_stages``-deep software pipeline
(``tl.range``), weights evict-first and activations evict-last, and multiplies on the tensor cores
(``tl.dot`` with the batch padded to 16 rows: the GEMV is memory-bound, the padding costs no bytes). Each
program writes an fp32 partial; one ``sum`` over SPLIT reduces them (deterministic, unlike atomics, for
SPLIT·B·N·4 extra bytes: 64 KB at the 1B shape, against 12.7 MB of bf16 weights).

Grid at the shapes of the GPU check (BLOCK_N 64, 132 SMs, SPLIT chosen for >= 2 programs per SM):
1B down (N 2048, K = n_R+n_C 3097): 32 × 9 = 288 programs, 3097/9 → 384 columns each (3 BLOCK_K tiles);
7B down (N 4096, K 7885): 64 × 5 = 320 programs, 1664 columns each (13 tiles). Bytes in flight per SM:
2 programs × num_stages 3 × a [64, 128] bf16 tile = 96 KB.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # triton is a Linux-only dependency; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# Tuning constants, each with its reason:
BLOCK_N = 64  # 64 output rows × 128 columns of bf16 = a 16 KB tile: 4 stages fit twice in an SM's 228 KB
BLOCK_K = 128  # 256 contiguous bytes of one weight row per load (bf16): whole 32-byte sectors, 16-byte vectors
BLOCK_B = 16  # tl.dot's smallest M; decode batches up to 16 share one read of the weights
NUM_STAGES = 3  # loads in flight per program before the first use: hides one HBM round trip per tile
PROGRAMS_PER_SM = 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SELECT_MAX = 8192  # one program sorts next_pow2(n_C) keys in registers; larger bands use the torch path


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on a CPU: an H100/H200's count, so the grid matches the GPU's


def split_for(N: int, K: int, sms: int) -> int:
    """SPLIT so that the grid covers the chip PROGRAMS_PER_SM times, each slab at least one BLOCK_K tile."""
    col_blocks = triton.cdiv(N, BLOCK_N)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, col_blocks)
    return max(1, min(want, triton.cdiv(K, BLOCK_K)))


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, part_ptr, B, N, K, stride_xb, stride_wn, k_per_split,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        bs = tl.arange(0, BLOCK_B)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < k_hi
            w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=(rows[:, None] < N) & kmask[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + bs[:, None] * stride_xb + ks[None, :], mask=(bs[:, None] < B) & kmask[None, :],
                        other=0.0, eviction_policy="evict_last")
            if UPCAST:  # Triton's CPU interpreter multiplies bf16 wrongly: fp32 products of bf16 are exact
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out = part_ptr + pid_s * B * N + bs[:, None] * N + rows[None, :]
        tl.store(out, acc, mask=(bs[:, None] < B) & (rows[None, :] < N))

    @triton.jit
    def _select_kernel(h_ptr, wn_ptr, mask_ptr, B, n_R, n_C, k, stride_hb, BLOCK_C: tl.constexpr):
        cs = tl.arange(0, BLOCK_C)
        valid = cs < n_C
        sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for b in range(B):
            h = tl.load(h_ptr + b * stride_hb + n_R + cs, mask=valid, other=0.0).to(tl.float32)
            sq += h * h
        score = tl.sqrt(sq) * tl.load(wn_ptr + cs, mask=valid, other=0.0)
        score = score + 0.0  # -0.0 -> +0.0, as partition.rank_keys
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        bits = tl.where(score != score, -2147483648, bits)  # NaN ranks last
        key = (bits.to(tl.int64) << 32) + (n_C - 1 - cs).to(tl.int64)
        key = tl.where(valid, key, -9223372036854775807 - 1)  # padding lanes below every real key
        ranked = tl.sort(key, descending=True)
        kth = tl.sum(tl.where(cs == k - 1, ranked, 0))
        keep = (key >= kth) & valid
        tl.store(mask_ptr + cs, tl.where(keep, 1.0, 0.0), mask=valid)  # fp32 0/1


def gemv_triton(x2: Tensor, w: Tensor, launch=None) -> Tensor:
    """x2 [B ≤ 16, K'] · wᵀ for w [N, K ≥ K'] (row-major, K contiguous) -> [B, N] in x2's dtype.

    w may be a layout padded with zero columns (``layout.ROW_ALIGN``): x2 is zero-padded to its width, so every
    load runs to a 16-element boundary and vectorizes (a mask that ends mid-vector makes Triton load scalars).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    if x2.shape[1] < K:
        x2 = torch.nn.functional.pad(x2, (0, K - x2.shape[1]))
    B = x2.shape[0]
    if B > BLOCK_B:
        raise ValueError(f"gemv_triton serves batches of at most {BLOCK_B} rows, got {B}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    split = split_for(N, K, _sm_count(x2.device))
    k_per_split = triton.cdiv(triton.cdiv(K, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(K, k_per_split)
    part = torch.empty(split, B, N, dtype=torch.float32, device=x2.device)
    kernel = launch(_gemv_kernel) if launch is not None else _gemv_kernel
    kernel[(triton.cdiv(N, BLOCK_N), split)](
        x2, w, part, B, N, K, x2.stride(0), w.stride(0), k_per_split,
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NUM_STAGES=NUM_STAGES,
        IEEE=x2.dtype == torch.float32 or _INTERPRET, UPCAST=_INTERPRET)
    return part.sum(0).to(x2.dtype)


def select_triton(h2: Tensor, wd_norm_c: Tensor, n_R: int, k: int, launch=None) -> Tensor:
    """h2 [B, n_R + n_C] with the candidates outside the step's top-k zeroed (R untouched)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, n_rc = h2.shape
    n_C = n_rc - n_R
    block = triton.next_power_of_2(n_C)
    if block > SELECT_MAX:
        raise ValueError(f"select_triton sorts at most {SELECT_MAX} candidates in one program, got n_C={n_C}")
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    mask = torch.empty(n_C, dtype=torch.float32, device=h2.device)
    kernel = launch(_select_kernel) if launch is not None else _select_kernel
    # num_warps: keep the sorted keys in registers (8 int64 keys per thread at most)
    kernel[(1,)](h2, wd_norm_c, mask, B, n_R, n_C, k, h2.stride(0), BLOCK_C=block,
                 num_warps=max(4, min(16, block // 256)))
    return torch.cat([h2[:, :n_R], h2[:, n_R:] * mask.to(h2.dtype)], dim=-1)


__all__ = ["gemv_triton", "select_triton", "split_for", "triton"]
