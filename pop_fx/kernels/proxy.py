"""Proxy-scored candidates (``PopConfig.candidate_proxy``): rank C from a cheap int8 copy, compute only R ∪ chosen.

Beyond the paper. POP computes every candidate exactly and keeps the best; with a wide band that costs
most of the dense FFN. Here each decode step

    H̃_C   = act(x · G̃_Cᵀ) · (x · Ũ_Cᵀ)            ("int8": gate and up copies)   or   act(x · G̃_Cᵀ)  ("int8-gate")
    S_t   = top_{n_select}( ||H̃_C||_rows · ||Wd[:, C]|| )          (partition.candidate_scores, as POP)
    z     = x · W_in[R ∪ S_t]ᵀ                                       (exact gate/up, n_keep channels only)
    y     = down over R ∪ S_t                                        (exact)

G̃, Ũ are per-row symmetric int8 copies of the gate/up weights made once, from the weights alone (no data,
no training): ``w ≈ q · s`` with ``s = max|w_row| / 127``. The active channel count is n_keep every step,
like POP's. Three ops, one contract each, each with its torch body (the CPU path: Inductor traces it and
fuses the row gathers into its reduction loops, so no gathered copy of a weight is materialized):

* ``pop::proxy_select`` — proxy activations of C and the top-n_select positions within C;
* ``pop::gather_in``    — exact gate/up rows of R (contiguous) and of the chosen candidates (gathered);
* ``pop::decode_sel``   — the down projection over R ∪ chosen (a masked GEMV over the R ∪ C layout).

On CUDA the row products run in ``_rows_gemv_kernel`` (Triton): one program per BLOCK_R gathered rows
of one batch row streams those rows of the int8 copy (with their scales) or of the fp layout, so no
gathered copy is materialized; the down projection reuses ``decode_down``'s kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.kernels.candidate_topk import candidate_topk

try:  # triton is a Linux-only dependency; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BITS = {"int8": 8, "int8-gate": 8, "int3": 3}
"""bits per weight of each proxy copy (the cost model reads them)"""
PROXIES = tuple(BITS)
# Activations the proxy ops can apply (by position: the graph carries the index, an int).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(code: int):
    name = ACTIVATIONS[code]
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: ``w ≈ q.float() * s[:, None]`` ([n, d] int8, [n] fp32). All-zero rows get s = 1."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_rows_int3(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric 3-bit, bit-plane packed: ([n, 3, ⌈d/8⌉] uint8, [n] fp32 scales); see ``pack_int3``."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=-1) / 3.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wf / s[:, None]).clamp_(-3, 3).to(torch.int8)
    return pack_int3(q), s


def pack_int3(q: Tensor) -> Tensor:
    """Values in [-3, 3] ([n, d] int8) -> 3 bit planes of u = q + 3, [n, 3, D8] uint8 with D8 = ⌈d/8⌉.

    Bit i of byte j of plane p is bit p of element k = i·D8 + j: unpacking byte j by shifting 0..7 yields
    8 runs of D8 consecutive elements, so the unpacked row is contiguous and the dot product vectorizes.
    Exactly 3 bits per element (columns past d are padding: u = 3, value 0).
    """
    n, d = q.shape
    d8 = -(-d // 8)
    u = torch.full((n, 8 * d8), 3, dtype=torch.int32, device=q.device)
    u[:, :d] = q.to(torch.int32) + 3
    u = u.reshape(n, 8, d8)
    shifts = torch.arange(8, dtype=torch.int32, device=q.device)[None, :, None]
    planes = [(((u >> p) & 1) << shifts).sum(1) for p in range(3)]
    return torch.stack(planes, dim=1).to(torch.uint8)


def unpack_int3(packed: Tensor, d: int) -> Tensor:
    """Inverse of ``pack_int3``: [n, 3, D8] uint8 -> [n, d] int values in [-3, 3] (int32)."""
    n, _, d8 = packed.shape
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)[None, :, None]
    p = packed.to(torch.int32)
    u = sum(((p[:, i, None, :] >> shifts) & 1) << i for i in range(3))
    return u.reshape(n, 8 * d8)[:, :d] - 3


def dequantize(q: Tensor, s: Tensor, d: int) -> Tensor:
    """The proxy rows as fp32 [n, d] (int8 rows, or bit-plane packed int3 rows)."""
    vals = unpack_int3(q, d) if q.dim() == 3 else q
    return vals.float() * s[:, None]


def proxy_tables(gate: Tensor, up: Tensor | None, proxy: str) -> tuple[Tensor, Tensor]:
    """The site's proxy copy: rows [gate; up] ("int8", "int3") or [gate] ("int8-gate"), quantized per row."""
    if proxy not in PROXIES:
        raise ValueError(f"candidate_proxy={proxy!r} is invalid: allowed one of {list(PROXIES)}")
    rows = [gate] if proxy == "int8-gate" or up is None else [gate, up]
    quant = quantize_rows_int3 if proxy == "int3" else quantize_rows
    q, s = zip(*(quant(w) for w in rows))
    return torch.cat(q), torch.cat(s)


def _rows_dot(x2: Tensor, q: Tensor, s: Tensor, rows: Tensor) -> Tensor:
    """x2 [B, d] · (q[rows] · s[rows])ᵀ -> [B, |rows|] in fp32, written as a reduction so the gather fuses."""
    if q.dim() == 3:
        return _planes_dot(x2, q, s, rows)
    return (q[rows].float()[None] * x2.float()[:, None, :]).sum(-1) * s[rows]


def _planes_dot(x2: Tensor, q: Tensor, s: Tensor, rows: Tensor) -> Tensor:
    """The int3 product straight from the bit planes: Σ_k x_k·(u_k − 3) = Σ_p 2^p Σ_i Σ_j bit_i(P_p[j])·x[i·D8+j] − 3·Σ x.

    Each of the 24 (plane, bit) terms is a reduction over D8 contiguous bytes with an affine index, which
    Inductor vectorizes; unpacking to [rows, d] first makes it index by k // D8 and k % D8 (~5× slower on CPU).
    """
    planes = q[rows].to(torch.int32)  # [r, 3, D8]
    d8 = planes.shape[-1]
    xf = x2.float()
    if xf.shape[-1] < 8 * d8:  # padding columns hold value 0: pad x with zeros to match
        xf = F.pad(xf, (0, 8 * d8 - xf.shape[-1]))
    acc = -3.0 * xf.sum(-1, keepdim=True)
    for p in range(3):
        for i in range(8):
            bits = ((planes[:, p, :] >> i) & 1).float()
            acc = acc + (bits[None] * xf[:, None, i * d8:(i + 1) * d8]).sum(-1) * float(1 << p)
    return acc * s[rows]


def proxy_activation(x2: Tensor, q: Tensor, s: Tensor, c_idx: Tensor, d_ff: int, act: int, both: bool) -> Tensor:
    """H̃ of the channels ``c_idx`` for the rows of x2: act(g̃)·ũ, or act(g̃) for a gate-only proxy."""
    h = activation(act)(_rows_dot(x2, q, s, c_idx))
    if both:
        h = h * _rows_dot(x2, q, s, c_idx + d_ff)
    return h


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


def _on_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda" and triton is not None


def _in_rows(sel: Tensor, n_R: int, n_rc: int, n_in: int) -> Tensor:
    """Layout rows of R then the chosen candidates, for each of the n_in input blocks."""
    keep = torch.cat([torch.arange(n_R, device=sel.device), n_R + sel])
    return torch.cat([keep + i * n_rc for i in range(n_in)])


@torch.library.triton_op("pop::proxy_select", mutates_args=())
def proxy_select(x: Tensor, q: Tensor, s: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int,
                 d_ff: int, act: int) -> Tensor:
    """Positions within C ([n_select], int64) of the candidates this step computes, ranked by the proxy."""
    x2 = x.reshape(-1, x.shape[-1])
    both = q.shape[0] == 2 * d_ff
    c_idx = rc_idx[0, n_R:]
    if not _on_cuda(x) or q.dim() == 3:  # int3 bit planes: the torch body (Inductor generates the kernel)
        h_c = proxy_activation(x2, q, s, c_idx, d_ff, act, both=both)
    else:
        rows = torch.cat([c_idx, c_idx + d_ff]) if both else c_idx
        z = rows_gemv_triton(x2, q, rows, s, torch.float32, launch=torch.library.wrap_triton)
        n_C = c_idx.numel()
        h_c = activation(act)(z[:, :n_C])
        if both:
            h_c = h_c * z[:, n_C:]
    return candidate_topk(h_c, wd_norm_c, n_select)


@torch.library.triton_op("pop::gather_in", mutates_args=())
def gather_in(x: Tensor, w_in: Tensor, b_in: Tensor | None, sel: Tensor, n_R: int, n_rc: int, n_in: int) -> Tensor:
    """Exact gate/up over R ∪ chosen: [..., n_in·n_keep], each input's R then chosen (the activation's layout)."""
    x2 = x.reshape(-1, x.shape[-1])
    if _on_cuda(x):
        rows = _in_rows(sel, n_R, n_rc, n_in)
        z = rows_gemv_triton(x2, w_in, rows, launch=torch.library.wrap_triton)
        if b_in is not None:
            z = z + b_in[rows]
        return z.reshape(*x.shape[:-1], z.shape[-1])
    parts = []
    for i in range(n_in):
        base = i * n_rc
        parts.append(x2 @ w_in[base: base + n_R].t())  # R: contiguous rows, one GEMV
        rows = base + n_R + sel
        z = (w_in[rows][None] * x2[:, None, :]).sum(-1)  # chosen: gathered rows, fused into the reduction
        parts.append(z.to(x2.dtype))
    z = torch.cat(parts, dim=-1)
    if b_in is not None:
        z = z + b_in[_in_rows(sel, n_R, n_rc, n_in)]
    return z.reshape(*x.shape[:-1], z.shape[-1])


@torch.library.triton_op("pop::decode_sel", mutates_args=())
def decode_sel(h: Tensor, wd_t: Tensor, bd: Tensor | None, sel: Tensor, n_R: int) -> Tensor:
    """Down projection of h ([..., n_R + n_select]: R then the chosen) through the R ∪ C layout ``wd_t``."""
    h2 = h.reshape(-1, h.shape[-1])
    n_C = wd_t.shape[0] - n_R
    if _on_cuda(h):  # decode_down's kernel reads h at R and at the chosen layout rows only
        from pop_fx.kernels.decode_down import decode_down_triton

        h_rc = torch.zeros(h2.shape[0], n_R + n_C, dtype=h2.dtype, device=h2.device).index_copy(
            1, _in_rows(sel, n_R, n_R + n_C, 1), h2)
        y = decode_down_triton(h_rc, wd_t, sel, n_R, launch=torch.library.wrap_triton)
        if bd is not None:
            y = y + bd
        return y.reshape(*h.shape[:-1], wd_t.shape[1])
    # The chosen candidates' activations scattered into C's positions (zeros elsewhere), then ONE GEMV over
    # R ∪ C rows: on a CPU that streams contiguous rows, where a row gather would copy them first.
    h_c = torch.zeros(h2.shape[0], n_C, dtype=h2.dtype, device=h2.device).index_copy(1, sel, h2[:, n_R:])
    y = torch.cat([h2[:, :n_R], h_c], dim=-1) @ wd_t
    if bd is not None:
        y = y + bd
    return y.reshape(*h.shape[:-1], wd_t.shape[1])
