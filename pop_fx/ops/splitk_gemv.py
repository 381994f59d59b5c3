"""Triton kernels of the CUDA decode path: candidate selection in one program, and a split-K GEMV.

Not ops: ``pop::decode`` and ``pop::decode_seq`` launch them when ``kernels="triton"`` (the CUDA default stays
the torch path — cuBLAS's GEMV over the masked activations — until a GPU run measures these faster; see
docs/gpu.md). Each has a torch reference the tests compare with under ``TRITON_INTERPRET=1`` and an
ahead-of-time sm_90 compile check under both supported Triton versions (``tests/pop_fx/ops/test_triton_sm90.py``).

``_select_kernel`` — one program per step: scores the n_C candidates (||h[:, c]||_rows · ||Wd[:, c]||, the root
exact: ``sqrt_rn``, as torch computes it, so near-ties rank as on the torch path), turns them into
``partition.rank_keys``'s order (monotone fp32 bits, ties by the lower index, NaN last) and writes the 0/1 mask
of the n_select best: a bitonic ``tl.sort`` of the 32-bit score bits over next_pow2(n_C) ≤ SELECT_MAX lanes in
registers gives the k-th largest, and a prefix count over the lanes equal to it keeps the lowest-indexed ones.
It replaces ``torch.topk`` + a scatter (a radix select and a second launch) and keeps docs/spec.md's tie-break
exactly. Wider bands (a 7B model at γ ≥ 0.58) take ``torch.topk`` instead (``pop::decode``'s Triton path).

``_gemv_kernel`` — y = (x ⊙ m) · Wᵀ for W [N, K] in ``nn.Linear``'s layout, x [B ≤ BLOCK_B, K' ≤ K] and an
optional candidate mask m over x's columns n_R.. (the select kernel's output, applied as x is loaded: no masked
copy of x, and columns K'..K of a padded layout read as zeros: no padded copy). Grid (N / BLOCK_N, SPLIT): each
program streams a [BLOCK_N, K / SPLIT] slab of W through a ``num_stages``-deep software pipeline (``tl.range``:
``cp.async`` copies into shared memory) and multiplies on the tensor cores (``tl.dot`` with the batch padded to
16 rows: the GEMV is memory-bound, the padding costs no bytes). Each program writes an fp32 partial;
``_gemv_finish_kernel`` sums them over SPLIT in a fixed order (deterministic, unlike atomics, for SPLIT·B·N·4
extra bytes: 64 KB at the 1B shape, against 12.7 MB of bf16 weights), adds the bias and casts, in one launch.
The loads ask for evict-first (weights) and evict-last (activations); Triton 3.9 lowers these hints onto the
pipelined copies (``cp.async ... L2::cache_hint`` with a ``createpolicy`` policy), Triton 3.6 (the GPU machine's)
drops them there: on 3.6 the weights are not marked evict-first. The sm_90 test checks the PTX of both.

Grid at the shapes of the GPU check (BLOCK_N 64, 132 SMs, SPLIT chosen for >= 2 programs per SM):
1B down (N 2048, K = n_R+n_C 3097): 32 × 9 = 288 programs, 3097/9 → 384 columns each (3 BLOCK_K tiles);
7B down (N 4096, K 7885): 64 × 5 = 320 programs, 1664 columns each (13 tiles). Bytes in flight per SM:
2 programs × num_stages 3 × a [64, 128] bf16 tile = 96 KB.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops._triton import INTERPRET, sm_count, tl, triton

# Tuning constants, each with its reason:
BLOCK_N = 64  # 64 output rows × 128 columns of bf16 = a 16 KB tile: 4 stages fit twice in an SM's 228 KB
BLOCK_K = 128  # 256 contiguous bytes of one weight row per load (bf16): whole 32-byte sectors, 16-byte vectors
# fp32 weights and activations: the same 256 bytes a row are 64 columns, over 8 warps. An unpadded x (its row
# stride not a multiple of 16, as h over R ∪ C is) loads without vectors; at 128 columns and 4 warps that spilled
# 12–16 bytes (sm_90 test, Triton 3.9); (64, 8) spills nothing under 3.6 and 3.9.
FP32_BLOCK_K, FP32_WARPS = 64, 8
BLOCK_B = 16  # tl.dot's smallest M; decode batches up to 16 share one read of the weights (the ops' batch limit)
NUM_STAGES = 3  # loads in flight per program before the first use: hides one HBM round trip per tile
PROGRAMS_PER_SM = 2
BLOCK_F = 1024  # outputs a finishing program sums over SPLIT (fp32 partials: 4 KB a split)
# One program sorts next_pow2(n_C) 32-bit keys in registers: 8192 lanes at 16 warps are 16 a thread, 107–128
# registers and no spills under Triton 3.6 and 3.9 (sm_90 test); wider bands use torch.topk.
SELECT_MAX = 8192


def select_warps(block: int) -> int:
    """num_warps of the select kernel for next_pow2(n_C) = ``block`` lanes: at most 16 keys a thread."""
    return max(4, min(16, block // 512))


def gemv_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the split-K GEMV for activations and weights of ``dtype``."""
    return (FP32_BLOCK_K, FP32_WARPS) if dtype == torch.float32 else (BLOCK_K, 4)


def split_for(N: int, K: int, sms: int, block_k: int = BLOCK_K) -> int:
    """SPLIT so that the grid covers the chip PROGRAMS_PER_SM times, each slab at least one ``block_k`` tile."""
    col_blocks = triton.cdiv(N, BLOCK_N)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, col_blocks)
    return max(1, min(want, triton.cdiv(K, block_k)))


def select_fits(n_C: int) -> bool:
    """Whether the select kernel ranks ``n_C`` candidates (one program, next_pow2(n_C) ≤ SELECT_MAX lanes)."""
    return triton is not None and triton.next_power_of_2(max(n_C, 1)) <= SELECT_MAX


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, m_ptr, w_ptr, part_ptr, B, N, K, Kx, n_R, stride_xb, stride_wn, k_per_split,
                     MASKED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            xk = ks < Kx  # columns past x's width (a padded layout's) read as zeros
            x = tl.load(x_ptr + bs[:, None] * stride_xb + ks[None, :], mask=(bs[:, None] < B) & xk[None, :],
                        other=0.0, eviction_policy="evict_last")
            if UPCAST:  # Triton's CPU interpreter multiplies bf16 wrongly: fp32 products of bf16 are exact
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if MASKED:  # the candidate mask over columns n_R..Kx (R's columns: 1), applied as x is loaded
                m = tl.load(m_ptr + (ks - n_R), mask=(ks >= n_R) & xk, other=1.0, eviction_policy="evict_last")
                x = x * m.to(x.dtype)[None, :]  # 0/1: exact in every dtype (and NaN stays NaN, as h * mask)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out = part_ptr + pid_s * B * N + bs[:, None] * N + rows[None, :]
        tl.store(out, acc, mask=(bs[:, None] < B) & (rows[None, :] < N))

    @triton.jit
    def _gemv_finish_kernel(part_ptr, bias_ptr, y_ptr, BN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr):
        # y[i] = Σ_s part[s, i] (+ bias[i % N]), cast to y's dtype: the split reduction, bias and cast in one launch
        i = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
        im = i < BN
        acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for s in range(SPLIT):  # a fixed order: deterministic
            acc += tl.load(part_ptr + s * BN + i, mask=im, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + i % N, mask=im, other=0.0).to(tl.float32)
        tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=im)

    @triton.jit
    def _select_kernel(h_ptr, wn_ptr, mask_ptr, B, n_R, n_C, k, stride_hb, BLOCK_C: tl.constexpr):
        cs = tl.arange(0, BLOCK_C)
        valid = cs < n_C
        sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for b in range(B):
            h = tl.load(h_ptr + b * stride_hb + n_R + cs, mask=valid, other=0.0).to(tl.float32)
            sq += h * h
        score = tl.sqrt_rn(sq) * tl.load(wn_ptr + cs, mask=valid, other=0.0)
        score = score + 0.0  # -0.0 -> +0.0, as partition.rank_keys
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the score
        bits = tl.where((score != score) | (cs >= n_C), -2147483648, bits)  # NaN and padding lanes rank last
        # partition.rank_keys orders by (bits, lower index): the k-th largest bits T, every lane above it, and of
        # the lanes equal to T the lowest-indexed k - #(> T). Sorting 32-bit bits (not 64-bit keys) halves the
        # registers the sort holds.
        kth = tl.sum(tl.where(cs == k - 1, tl.sort(bits, descending=True), 0))
        above = bits > kth
        tied = bits == kth
        take_tied = k - tl.sum(above.to(tl.int32))
        keep = (above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= take_tied))) & valid
        tl.store(mask_ptr + cs, tl.where(keep, 1.0, 0.0), mask=valid)  # fp32 0/1


def gemv_triton(x2: Tensor, w: Tensor, launch=None, mask: Tensor | None = None, n_R: int = 0,
                bias: Tensor | None = None) -> Tensor:
    """(x2 ⊙ [1_R, mask]) · wᵀ (+ bias) for w [N, K] (row-major, K contiguous), x2 [B ≤ BLOCK_B, K' ≤ K] -> [B, N]
    in x2's dtype. ``mask`` [K' − n_R] (any dtype, 0/1) multiplies x2's columns n_R.. as they are loaded.

    w may be a layout padded with zero columns (``layout.ROW_ALIGN``): its columns past K' meet zeros (masked
    loads, no padded copy of x2); the kernel's K runs to the padded width, so every weight load runs to a
    16-element boundary and vectorizes (a mask that ends mid-vector makes Triton load scalars).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    B, Kx = x2.shape
    if B > BLOCK_B:
        raise ValueError(f"gemv_triton serves batches of at most {BLOCK_B} rows, got {B}")
    if Kx > K:
        raise ValueError(f"x has {Kx} columns, the weight {K}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    if mask is not None:
        mask = mask.reshape(-1).contiguous()
    block_k, warps = gemv_tile(x2.dtype)
    split = split_for(N, K, sm_count(x2.device), block_k)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    part = torch.empty(split, B, N, dtype=torch.float32, device=x2.device)
    wrap = launch if launch is not None else (lambda k: k)
    wrap(_gemv_kernel)[(triton.cdiv(N, BLOCK_N), split)](
        x2, mask if mask is not None else x2, w, part, B, N, K, Kx, n_R, x2.stride(0), w.stride(0), k_per_split,
        MASKED=mask is not None, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=block_k, NUM_STAGES=NUM_STAGES,
        IEEE=x2.dtype == torch.float32 or INTERPRET, UPCAST=INTERPRET, num_warps=warps)
    y = torch.empty(B, N, dtype=x2.dtype, device=x2.device)
    wrap(_gemv_finish_kernel)[(triton.cdiv(B * N, BLOCK_F),)](
        part, bias if bias is not None else part, y, B * N, N, split, HAS_BIAS=bias is not None, BLOCK_F=BLOCK_F)
    return y


def select_mask_triton(h2: Tensor, wd_norm_c: Tensor, n_R: int, k: int, launch=None) -> Tensor:
    """[n_C] fp32 0/1: the top-k candidates of h2 [B, n_R + n_C] (``partition.candidate_topk``'s set, as a mask)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, n_rc = h2.shape
    n_C = n_rc - n_R
    if not select_fits(n_C):
        raise ValueError(f"select_triton sorts at most {SELECT_MAX} candidates in one program, got n_C={n_C}")
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    block = triton.next_power_of_2(n_C)
    mask = torch.empty(n_C, dtype=torch.float32, device=h2.device)
    kernel = launch(_select_kernel) if launch is not None else _select_kernel
    kernel[(1,)](h2, wd_norm_c, mask, B, n_R, n_C, k, h2.stride(0), BLOCK_C=block, num_warps=select_warps(block))
    return mask


def select_triton(h2: Tensor, wd_norm_c: Tensor, n_R: int, k: int, launch=None) -> Tensor:
    """h2 [B, n_R + n_C] with the candidates outside the step's top-k zeroed (R untouched): for tests and reports
    (the decode op hands ``select_mask_triton``'s mask to the GEMV instead of writing this copy)."""
    mask = select_mask_triton(h2, wd_norm_c, n_R, k, launch)
    return torch.cat([h2[:, :n_R], h2[:, n_R:] * mask.to(h2.dtype)], dim=-1)


__all__ = ["BLOCK_B", "SELECT_MAX", "gemv_tile", "gemv_triton", "select_fits", "select_mask_triton", "select_triton", "split_for",
           "triton"]
