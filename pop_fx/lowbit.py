"""Low-precision copies of gate/up rows for proxy-scored candidates (``PopConfig.candidate_proxy``).

Made once from the weights alone (no data, no training): per-row symmetric int8 (``w ≈ q · s``,
``s = max|w_row| / 127``) or per-row 3-bit packed in bit planes. The compiled proxy ops
(``pop_fx.ops.proxy_select``), the eager reference and the cost model all read these definitions.
"""

from __future__ import annotations

import torch
from torch import Tensor

BITS = {"int8": 8, "int8-gate": 8, "int3": 3, "int8-values": 8}
"""bits per weight of each proxy copy (the cost model reads them)"""
PROXIES = tuple(BITS)


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
    if proxy == VALUES:
        return values_tables(gate, up)
    rows = [gate] if proxy == "int8-gate" or up is None else [gate, up]
    quant = quantize_rows_int3 if proxy == "int3" else quantize_rows
    q, s = zip(*(quant(w) for w in rows))
    return torch.cat(q), torch.cat(s)


# ---------------------------------------------------------------------------------------------------------------
# "int8-values": the int8 copy's activations ARE the chosen channels' H (low-precision full re-evaluation)
# ---------------------------------------------------------------------------------------------------------------

VALUES = "int8-values"
VALUES_DTYPE = torch.bfloat16
"""activation and scale dtype of the int8 row products (``aten._weight_int8pack_mm``). Measured on the 2-core CPU
(batch 1, [2·d_ff, d] int8): bf16 43 µs (SmolLM2) / 1.5 ms (1B shape); fp32 activations 0.86 / 15.7 ms and fp16
4.5 / 34 ms (no fast path), so bf16 it is, although fp16 would round 8× finer."""


def bf16_scales(w: Tensor) -> Tensor:
    """Per-row scales ``max|w_row| / 127`` rounded UP to bf16 (fp32 values): the kernel reads them exactly as bf16
    and no |w| / s exceeds 127, so the copy keeps the half-step error bound of ``quantize_rows``."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    sb = s.to(VALUES_DTYPE)
    up = torch.nextafter(sb, torch.full_like(sb, float("inf")))
    return torch.where(sb.float() < s, up, sb).float()


def values_tables(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """The "int8-values" copy: rows [gate; up] ([2·d_ff, d] int8) with bf16 per-row scales ([2·d_ff] bf16)."""
    qs = []
    for w in (gate, up):
        s = bf16_scales(w)
        q = torch.round(w.detach().float() / s[:, None]).clamp_(-127, 127).to(torch.int8)
        qs.append((q, s))
    return torch.cat([q for q, _ in qs]).contiguous(), torch.cat([s for _, s in qs]).to(VALUES_DTYPE)


def down_channel_major(wd: Tensor) -> Tensor:
    """``nn.Linear``'s down weight [d_out, d_ff] as a channel-major copy [d_ff, d_out] (contiguous rows per channel):
    ``F.embedding_bag`` then reads exactly the chosen channels' rows. Made once per model, from the weights."""
    return wd.detach().t().contiguous()


def int8_rows_mm(x2: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """x2 [N, d] · (q · s)ᵀ -> [N, rows] in fp32: x rounded to bf16, int8 × bf16 products, the result rounded to
    bf16 (``aten._weight_int8pack_mm``: bf16 in, bf16 out). The compiled op and the eager reference both call this."""
    return torch.ops.aten._weight_int8pack_mm(x2.to(VALUES_DTYPE).contiguous(), q, s).float()


def int8_rows_reduce(x2: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """``int8_rows_mm`` as one reduction Inductor compiles: x rounded to bf16, each bf16 × int8 product exact in fp32,
    summed in fp32, times the bf16 scale, rounded to bf16 — the same numbers up to the order of the fp32 sum. Under
    Inductor the int8 → fp32 conversion fuses into the reduction loop, so the int8 bytes are read once, with no
    packed kernel's compute bound (``examples/values_rows.py`` times both). Eagerly it materialises [N, rows, d]:
    compiled use only (an autotuned choice of ``pop::values_decode``)."""
    xb = x2.float() if x2.dtype == VALUES_DTYPE else round_bf16(x2.float())  # a bf16 x is already rounded
    return round_bf16((xb[:, None, :] * q.float()[None]).sum(-1) * s.float())


def round_bf16(v: Tensor) -> Tensor:
    """fp32 ``v`` rounded to the nearest bf16 (ties to even), kept in fp32 — as ``v.to(bfloat16).float()`` but in
    integer ops on the bits: Inductor drops a ``.to(bfloat16).float()`` pair inside a compiled graph (unless
    ``emulate_precision_casts``), and the reduce choice must round where the packed kernel does. Finite inputs."""
    i = v.contiguous().view(torch.int32)
    i = (i + (0x7FFF + ((i >> 16) & 1))) & -65536
    return i.view(torch.float32)


ROWS = {"pack": int8_rows_mm, "reduce": int8_rows_reduce}
"""the two implementations of the int8 row products ("pack": the eager reference's)"""


def values_activations(x2: Tensor, q: Tensor, s: Tensor, d_ff: int, act: int, rows: str = "pack") -> Tensor:
    """H̃ = act(g̃) · ũ of every channel ([N, d_ff], fp32; act applied in fp32 to the bf16 products); ``rows``
    names the row-product implementation (``ROWS``)."""
    from pop_fx.activations import activation

    z = ROWS[rows](x2, q, s)
    return activation(act)(z[:, :d_ff]) * z[:, d_ff:]


__all__ = ["BITS", "PROXIES", "VALUES", "VALUES_DTYPE", "ROWS", "bf16_scales", "down_channel_major", "int8_rows_mm", "int8_rows_reduce", "round_bf16",
           "values_activations", "values_tables", "dequantize", "pack_int3", "proxy_tables", "quantize_rows", "quantize_rows_int3",
           "unpack_int3"]
