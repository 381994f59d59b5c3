"""The CUDA body of ``pop::proxy_select``: one fused Triton kernel scores the candidate band from the proxy copy.

For each candidate channel c (position i in C) and each batch row b:

    g̃[b, i] = (Σ_k x[b, k] · q[c, k]) · s[c]              (int8 rows, or int3 bit planes; scale after the reduction)
    ũ[b, i] = (Σ_k x[b, k] · q[c + d_ff, k]) · s[c + d_ff]  ("int8" / "int3": gate and up copies; not "int8-gate")
    h̃[b, i] = act(g̃) · ũ   (or act(g̃))
    score_i = ||h̃[:, i]||_2 · wd_norm_c[i]                  (``partition.candidate_scores``, scope="batch")

and writes the [n_C] fp32 scores, or (what the op uses) their ``partition.rank_keys`` as int64 — monotone fp32
bits, ties by the lower position — so the selection is one ``torch.topk`` over them (exactly
``partition.candidate_topk``: docs/spec.md's tie-break by the lower index, NaN last). The torch reference is
``proxy_select.proxy_activation`` + ``candidate_topk`` (the op's CPU body); tests compare them under
``TRITON_INTERPRET=1`` and compile both kernels for sm_90 ahead of time (tests/pop_fx/ops/).

Kernels:

* ``_proxy_int8_kernel`` — grid (⌈n_C / BLOCK_C⌉, SPLIT, ⌈B / BLOCK_B⌉). A program reads the gate row and the up
  row of BLOCK_C gathered channels over one K slab (``k_per_split`` columns) in [BLOCK_C, BLOCK_K] int8 tiles
  through a ``NUM_STAGES``-deep software pipeline (``tl.range``: ``cp.async`` copies into shared memory; the loads
  ask for evict-first weights and evict-last activations, hints Triton 3.9 lowers onto those copies and Triton 3.6,
  the GPU machine's, drops: checked in the sm_90 test's PTX), and multiplies on the tensor cores (``tl.dot``: int8 values are exact in bf16/fp16, the batch padded
  to BLOCK_B = 16 rows; the GEMV is memory-bound, the padding costs no HBM bytes).
* ``_proxy_int3_kernel`` — the same over ``lowbit.pack_int3``'s planes ([n, 3, D8] uint8, x zero-padded to
  8·D8): a tile is BLOCK_J bytes of each of the 3 planes of the gate and up rows; bit i of byte j is element
  i·D8 + j, so the 8 unpacked slices (u − 3 in [-3, 3], exact in bf16) each meet a contiguous slice of x.
* ``_proxy_finish_kernel`` — when SPLIT > 1 (or the batch spans several BLOCK_B blocks) the first kernel writes
  fp32 partial sums [SPLIT, 1|2, B, n_C]; this one reduces them in a fixed order (deterministic), then applies
  the scales, the activation, the product and the score. With SPLIT = 1 and B ≤ 16 the first kernel does it
  itself (one launch).

SPLIT is chosen so that the grid covers the chip PROGRAMS_PER_SM times (or every K tile has its own program).
Activations in Triton: every code of ``pop_fx.activations.ACTIVATIONS`` (silu, gelu (erf), gelu_tanh (tanh as
2·sigmoid(2y) − 1), relu); none falls back to torch.

Grid and weight bytes in flight (H200: 132 SMs; batch 1, bf16 activations, r = 0.5, gate and up; ``proxy_grid``
computes these; in flight = min(tiles, NUM_STAGES − 1) tiles a program × the programs an SM holds, at most 2):

======  ====  =====  ======  ===========================  =====  ===========  ==============
shape   γ     n_C    format  grid (C blocks × SPLIT)      tiles  band bytes   in flight / SM
======  ====  =====  ======  ===========================  =====  ===========  ==============
1B      0.1   563    int8    18 × 8 = 144, + finish       1      2.31 MB      16–17 KB (the whole band at once)
1B      0.1   563    int3    18 × 8 = 144, + finish       1      0.86 MB      6–7 KB (idem)
1B      0.6   3379   int8    106 × 3 = 318, + finish      3      13.8 MB      96 KB
1B      0.6   3379   int3    106 × 3 = 318, + finish      3      5.19 MB      36 KB
7B      0.1   1434   int8    45 × 6 = 270, + finish       3      11.7 MB      96 KB
7B      0.1   1434   int3    45 × 6 = 270, + finish       3      4.41 MB      36 KB
7B      0.6   8602   int8    269 × 1 = 269, one launch    16     70.5 MB      96 KB
7B      0.6   8602   int3    269 × 1 = 269, one launch    16     26.4 MB      48 KB
======  ====  =====  ======  ===========================  =====  ===========  ==============

ptxas (sm_90a, 4 warps; tests/pop_fx/ops/test_triton_sm90.py): int8 bf16 168 registers (178 in the one-launch
variant), 72 KB shared memory: 2–3 programs an SM; int3 bf16 164–168 registers, 56 KB; fp32 activations: int8 96–101
registers, 32 KB; int3 128 registers, 44 KB; no spills anywhere. The finishing kernel reads SPLIT·B·2·4 bytes a
channel (36 KB at 1B γ0.1) in ⌈n_C / 256⌉ programs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops._triton import INTERPRET, sm_count, tl, triton

# Tuning constants, each with its reason (ahead-of-time sm_90 compiles: no spills at any of them):
BLOCK_C = 32  # channels a program: gate + up tiles of 32 × 256 int8 = 16 KB a stage
BLOCK_B = 16  # tl.dot's smallest M; batches up to 16 share one read of the proxy rows
# (int3?, x is fp32?) -> (columns (int8) or plane bytes (int3) a tile, NUM_STAGES):
# int8: 256 contiguous bytes of a row per load (two whole 128-byte lines, 16-byte vectors); 4 stages = 3 tiles
#   (48 KB of weights) in flight a program, 72 KB of shared memory, 168 registers: 2 programs an SM.
# int3: 32 bytes of each plane (256 elements; the 8 slices of x a tile, not the planes, bound the registers);
#   6 KB of planes a stage, so 5 stages. fp32 x (its bf16 hi/mid/lo parts triple the dot operands): int8 64
#   columns a tile, 5 stages (4 tiles of 4 KB in flight); int3 16 bytes a plane.
TILES = {(False, False): (256, 4), (False, True): (64, 5), (True, False): (32, 5), (True, True): (16, 5)}
PROGRAMS_PER_SM = 2
BLOCK_F = 256  # the finishing kernel's channels a program (it reads SPLIT·B·2·4 bytes per channel)


def tiles_for(int3: bool, dtype: torch.dtype) -> tuple[int, int]:
    """(tile width, NUM_STAGES) of the kernel for the proxy format and the activations' dtype."""
    return TILES[(bool(int3), dtype == torch.float32)]


def plan(n_C: int, B: int, n_k: int, block_k: int, sms: int) -> tuple[int, int, int, int]:
    """(C blocks, SPLIT, batch blocks, k_per_split) for ``n_k`` columns (int8) or plane bytes (int3)."""
    n_cb, n_bb = triton.cdiv(n_C, BLOCK_C), triton.cdiv(B, BLOCK_B)
    tiles = triton.cdiv(n_k, block_k)
    split = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n_cb * n_bb), tiles))
    k_per_split = triton.cdiv(tiles, split) * block_k
    return n_cb, triton.cdiv(n_k, k_per_split), n_bb, k_per_split


if triton is not None:

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        # pop_fx.activations.ACTIVATIONS: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu — in fp32
        if ACT == 0:
            out = z * tl.sigmoid(z)
        elif ACT == 1:
            out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACT == 2:
            y = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            out = 0.5 * z * (2.0 * tl.sigmoid(2.0 * y))  # 1 + tanh(y) = 2·sigmoid(2y)
        else:
            out = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
        return out

    @triton.jit
    def _channel_h(g, u, sg, su, ACT: tl.constexpr, BOTH: tl.constexpr):
        h = _act(g * sg, ACT)
        if BOTH:
            h = h * (u * su)
        return h

    @triton.jit
    def _store_score(out_ptr, cs, cmask, score, n_C, KEYS: tl.constexpr):
        if KEYS:  # partition.rank_keys: monotone fp32 bits (-0.0 as 0.0, NaN lowest), ties by the lower position
            sc = score + 0.0
            bits = sc.to(tl.int32, bitcast=True)
            bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            bits = tl.where(sc != sc, -2147483648, bits)
            tl.store(out_ptr + cs, (bits.to(tl.int64) << 32) + (n_C - 1 - cs).to(tl.int64), mask=cmask)
        else:
            tl.store(out_ptr + cs, score, mask=cmask)

    @triton.jit
    def _epilogue(acc_g, acc_u, s_ptr, c, cmask, wn_ptr, cs, out_ptr, pid_s, b0, B, n_C, d_ff,
                  ACT: tl.constexpr, BOTH: tl.constexpr, FUSED: tl.constexpr, KEYS: tl.constexpr,
                  BLOCK_B: tl.constexpr):
        bs = b0 + tl.arange(0, BLOCK_B)
        if FUSED:  # the whole K and the whole batch are here: scales, activation, product, score
            sg = tl.load(s_ptr + c, mask=cmask, other=0.0)
            su = sg
            if BOTH:
                su = tl.load(s_ptr + c + d_ff, mask=cmask, other=0.0)
            h = _channel_h(acc_g, acc_u, sg[None, :], su[None, :], ACT, BOTH)
            h = tl.where(bs[:, None] < B, h, 0.0)
            score = tl.sqrt_rn(tl.sum(h * h, axis=0)) * tl.load(wn_ptr + cs, mask=cmask, other=0.0)
            _store_score(out_ptr, cs, cmask, score, n_C, KEYS)
        else:  # fp32 partial sums [SPLIT, 1|2, B, n_C]
            m = (bs[:, None] < B) & cmask[None, :]
            rows = 2 if BOTH else 1
            base = out_ptr + (pid_s * rows * B) * n_C + bs[:, None] * n_C + cs[None, :]
            tl.store(base, acc_g, mask=m)
            if BOTH:
                tl.store(base + B * n_C, acc_u, mask=m)

    @triton.jit
    def _dot_exact(a, b, UPCAST: tl.constexpr):
        # a [M, BK] and b [BK, N], both bf16/fp16 (b fp32 with UPCAST) -> fp32 (products exact in fp32)
        if UPCAST:  # Triton's CPU interpreter multiplies 2-byte floats wrongly: fp32 products are the same numbers
            out = tl.dot(a.to(tl.float32), b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _dot(x, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # x [BLOCK_B, BK] (bf16/fp16/fp32), w [BLOCK_C, BK] small integers (exact in bf16) -> [BLOCK_B, BLOCK_C] fp32
        if IEEE:
            # fp32 x = hi + mid + lo, three bf16 parts (8 significant bits each, 24 in all): three tensor-core
            # products with fp32 accumulation instead of an FMA dot (which spills at these tiles)
            wb = tl.trans(w.to(tl.float32 if UPCAST else tl.bfloat16))
            hi = x.to(tl.bfloat16)
            r = x - hi.to(tl.float32)
            mid = r.to(tl.bfloat16)
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
            out = _dot_exact(hi, wb, UPCAST) + _dot_exact(mid, wb, UPCAST) + _dot_exact(lo, wb, UPCAST)
        else:
            out = _dot_exact(x, tl.trans(w.to(tl.float32 if UPCAST else x.dtype)), UPCAST)
        return out

    @triton.jit
    def _proxy_int8_kernel(x_ptr, q_ptr, s_ptr, c_ptr, wn_ptr, out_ptr, B, n_C, K, d_ff, stride_xb, stride_q,
                           k_per_split, ACT: tl.constexpr, BOTH: tl.constexpr, FUSED: tl.constexpr,
                           KEYS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                           NUM_STAGES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        b0 = tl.program_id(2) * BLOCK_B
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < n_C
        c = tl.load(c_ptr + cs, mask=cmask, other=0)
        bs = b0 + tl.arange(0, BLOCK_B)
        g_rows = q_ptr + c[:, None] * stride_q
        u_rows = q_ptr + (c + d_ff)[:, None] * stride_q
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        acc_g = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < k_hi
            wm = cmask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + bs[:, None] * stride_xb + ks[None, :], mask=(bs[:, None] < B) & kmask[None, :],
                        other=0.0, eviction_policy="evict_last")
            g = tl.load(g_rows + ks[None, :], mask=wm, other=0, eviction_policy="evict_first")
            acc_g += _dot(x, g, IEEE, UPCAST)
            if BOTH:
                u = tl.load(u_rows + ks[None, :], mask=wm, other=0, eviction_policy="evict_first")
                acc_u += _dot(x, u, IEEE, UPCAST)
        _epilogue(acc_g, acc_u, s_ptr, c, cmask, wn_ptr, cs, out_ptr, pid_s, b0, B, n_C, d_ff,
                  ACT, BOTH, FUSED, KEYS, BLOCK_B)

    @triton.jit
    def _planes_dot(xs, xmask, planes_ptr, wm, stride_p, d8, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # planes_ptr [BLOCK_C, BLOCK_J] pointers to plane 0 (planes stride_p bytes apart); xs [BLOCK_B, BLOCK_J]
        # pointers to x[b, j]. Bit i of byte j is element i·D8 + j: unpacked slice i meets x[:, i·D8 + j].
        p0 = tl.load(planes_ptr, mask=wm, other=0, eviction_policy="evict_first").to(tl.int32)
        p1 = tl.load(planes_ptr + stride_p, mask=wm, other=0, eviction_policy="evict_first").to(tl.int32)
        p2 = tl.load(planes_ptr + 2 * stride_p, mask=wm, other=0, eviction_policy="evict_first").to(tl.int32)
        acc = _dot(tl.load(xs, mask=xmask, other=0.0, eviction_policy="evict_last"),
                   (p0 & 1) + ((p1 & 1) << 1) + ((p2 & 1) << 2) - 3, IEEE, UPCAST)
        for i in tl.static_range(1, 8):
            u = ((p0 >> i) & 1) + (((p1 >> i) & 1) << 1) + (((p2 >> i) & 1) << 2) - 3
            x = tl.load(xs + i * d8, mask=xmask, other=0.0, eviction_policy="evict_last")
            acc += _dot(x, u, IEEE, UPCAST)
        return acc

    @triton.jit
    def _proxy_int3_kernel(x_ptr, q_ptr, s_ptr, c_ptr, wn_ptr, out_ptr, B, n_C, D8, d_ff, stride_xb, stride_q,
                           stride_p, k_per_split, ACT: tl.constexpr, BOTH: tl.constexpr, FUSED: tl.constexpr,
                           KEYS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
                           NUM_STAGES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # q [n, 3, D8] uint8 with strides (stride_q, stride_p, 1); x [B, 8·D8] zero-padded
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        b0 = tl.program_id(2) * BLOCK_B
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < n_C
        c = tl.load(c_ptr + cs, mask=cmask, other=0)
        bs = b0 + tl.arange(0, BLOCK_B)
        g_rows = q_ptr + c[:, None] * stride_q
        u_rows = q_ptr + (c + d_ff)[:, None] * stride_q
        j_lo = pid_s * k_per_split
        j_hi = tl.minimum(D8, j_lo + k_per_split)
        acc_g = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for j0 in tl.range(j_lo, j_hi, BLOCK_J, num_stages=NUM_STAGES):
            js = j0 + tl.arange(0, BLOCK_J)
            jmask = js < j_hi
            wm = cmask[:, None] & jmask[None, :]
            xs = x_ptr + bs[:, None] * stride_xb + js[None, :]
            xmask = (bs[:, None] < B) & jmask[None, :]
            acc_g += _planes_dot(xs, xmask, g_rows + js[None, :], wm, stride_p, D8, IEEE, UPCAST)
            if BOTH:
                acc_u += _planes_dot(xs, xmask, u_rows + js[None, :], wm, stride_p, D8, IEEE, UPCAST)
        _epilogue(acc_g, acc_u, s_ptr, c, cmask, wn_ptr, cs, out_ptr, pid_s, b0, B, n_C, d_ff,
                  ACT, BOTH, FUSED, KEYS, BLOCK_B)

    @triton.jit
    def _proxy_finish_kernel(part_ptr, s_ptr, c_ptr, wn_ptr, out_ptr, B, n_C, d_ff, SPLIT,
                             ACT: tl.constexpr, BOTH: tl.constexpr, KEYS: tl.constexpr, BLOCK_F: tl.constexpr):
        cs = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
        cmask = cs < n_C
        c = tl.load(c_ptr + cs, mask=cmask, other=0)
        sg = tl.load(s_ptr + c, mask=cmask, other=0.0)
        su = sg
        if BOTH:
            su = tl.load(s_ptr + c + d_ff, mask=cmask, other=0.0)
        rows = 2 if BOTH else 1
        sq = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for b in range(B):
            g = tl.zeros((BLOCK_F,), dtype=tl.float32)
            u = tl.zeros((BLOCK_F,), dtype=tl.float32)
            for s in range(SPLIT):  # a fixed order: deterministic
                p = part_ptr + ((s * rows) * B + b) * n_C + cs
                g += tl.load(p, mask=cmask, other=0.0)
                if BOTH:
                    u += tl.load(p + B * n_C, mask=cmask, other=0.0)
            h = _channel_h(g, u, sg, su, ACT, BOTH)
            sq += h * h
        score = tl.sqrt_rn(sq) * tl.load(wn_ptr + cs, mask=cmask, other=0.0)
        _store_score(out_ptr, cs, cmask, score, n_C, KEYS)


def proxy_scores_triton(x2: Tensor, q: Tensor, s: Tensor, c_idx: Tensor, wd_norm_c: Tensor, d_ff: int, act: int,
                        launch=None, keys: bool = False) -> Tensor:
    """[n_C] fp32 POP scores of the candidates ``c_idx`` from the proxy copy (int8 [n, d] or int3 [n, 3, D8]).

    ``partition.candidate_scores(proxy_activation(x2, q, s, c_idx, d_ff, act, both), wd_norm_c)`` in one or two
    launches; ``launch`` wraps the kernels (``torch.library.wrap_triton`` inside the op). ``keys=True``: the
    scores' ``partition.rank_keys`` instead (int64, written by the same kernel), ready for ``torch.topk``.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    both = q.shape[0] == 2 * d_ff
    B = x2.shape[0]
    n_C = c_idx.numel()
    out = torch.empty(n_C, dtype=torch.int64 if keys else torch.float32, device=x2.device)
    if n_C == 0:
        return out
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    q = q.contiguous()
    c_idx = c_idx.contiguous()
    wd_norm_c = wd_norm_c.reshape(-1).float().contiguous()
    s = s.float().contiguous()
    int3 = q.dim() == 3
    if int3:
        d8 = q.shape[-1]
        if x2.shape[1] < 8 * d8:  # padding columns hold value 0: x is zero there too
            x2 = torch.nn.functional.pad(x2, (0, 8 * d8 - x2.shape[1]))
        n_k = d8
    else:
        n_k = q.shape[1]
    block_k, stages = tiles_for(int3, x2.dtype)
    n_cb, split, n_bb, k_per_split = plan(n_C, B, n_k, block_k, sm_count(x2.device))
    fused = split == 1 and n_bb == 1
    part = out if fused else torch.empty(split, 2 if both else 1, B, n_C, dtype=torch.float32, device=x2.device)
    ieee, upcast = x2.dtype == torch.float32, INTERPRET
    common = dict(ACT=act, BOTH=both, FUSED=fused, KEYS=keys, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, NUM_STAGES=stages,
                  IEEE=ieee, UPCAST=upcast)
    wrap = launch if launch is not None else (lambda k: k)
    grid = (n_cb, split, n_bb)
    if int3:
        wrap(_proxy_int3_kernel)[grid](x2, q, s, c_idx, wd_norm_c, part, B, n_C, d8, d_ff, x2.stride(0),
                                       q.stride(0), q.stride(1), k_per_split, BLOCK_J=block_k, **common)
    else:
        wrap(_proxy_int8_kernel)[grid](x2, q, s, c_idx, wd_norm_c, part, B, n_C, n_k, d_ff, x2.stride(0),
                                       q.stride(0), k_per_split, BLOCK_K=block_k, **common)
    if not fused:
        wrap(_proxy_finish_kernel)[(triton.cdiv(n_C, BLOCK_F),)](part, s, c_idx, wd_norm_c, out, B, n_C, d_ff,
                                                                 split, ACT=act, BOTH=both, KEYS=keys,
                                                                 BLOCK_F=BLOCK_F)
    return out


def proxy_grid(n_C: int, B: int, d: int, int3: bool = False, both: bool = True, dtype=torch.bfloat16,
               sms: int = 132) -> dict:
    """The launch plan at a shape, for reports: grid, tiles a program, one launch or two, weight bytes in flight.

    ``inflight_kb_per_program``: min(tiles, NUM_STAGES − 1) tiles of the gate (and up) rows, the loads the
    pipeline issues ahead of the first use; ``inflight_kb_per_sm`` multiplies by the programs an SM holds at
    once (min(PROGRAMS_PER_SM, programs / SMs), at least 1).
    """
    n_k = -(-d // 8) if int3 else d
    block_k, stages = tiles_for(int3, dtype)
    n_cb, split, n_bb, kps = plan(n_C, B, n_k, block_k, sms)
    programs = n_cb * split * n_bb
    tiles = kps // block_k
    tile_bytes = (2 if both else 1) * BLOCK_C * block_k * (3 if int3 else 1)
    per_prog = min(tiles, stages - 1) * tile_bytes
    resident = max(1.0, min(PROGRAMS_PER_SM, programs / sms))
    band = n_C * (2 if both else 1) * n_k * (3 if int3 else 1)
    return dict(grid=[n_cb, split, n_bb], programs=programs, tiles_per_program=tiles, stages=stages,
                fused=split == 1 and n_bb == 1, band_mb=band / 1e6, inflight_kb_per_program=per_prog / 1024,
                inflight_kb_per_sm=per_prog * resident / 1024)


__all__ = ["proxy_grid", "proxy_scores_triton", "triton"]
