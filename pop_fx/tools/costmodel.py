"""Per-decode-step cost of one FFN, dense vs POP, as sympy expressions (and their values for real shapes).

Symbols: ``d`` (d_model), ``f`` (d_ff), ``r`` (sparsity), ``γ`` (candidate_ratio), ``b`` (sequences in the batch,
one new token each). ``m`` below is the number of *input* matrices: 2 for a gated FFN (gate, up), 1 for a plain one.

Counted: the FFN's matrix products, 2 FLOPs per multiply-add, and the bytes of FFN weights read per decode step
(read once per step for the whole batch; ``scope="batch"``). Not counted: biases, the activation and the product
(O(b·f)), and POP's candidate scoring and top-k (O(b·γ·f)); all are ~1/d of what is counted.

Sizes (docs/spec.md) without rounding, ``n_keep = (1-r)·f``, ``n_R = max(0, n_keep - γ/2·f)``,
``n_C = min(γ·f, f - n_R)``. On the main domain ``γ/2 <= r <= 1 - γ/2`` that is

    n_R = (1 - r - γ/2)·f,   n_C = γ·f,   |R ∪ C| = (1 - r + γ/2)·f

and per decode step:

    dense:  FLOPs = 2·b·d·f·(m + 1)             weights = s·d·f·(m + 1)
    POP:    FLOPs = 2·b·d·(m·|R ∪ C| + n_keep)   weights = s·d·(m·|R ∪ C| + n_keep)   (s = bytes per element)

POP's gate/up run over R ∪ C, its down projection over the n_keep kept channels. The candidate-region
overhead is what POP computes beyond a static mask of the same n_keep: the gate/up rows of the candidates
not selected (C ∖ S, γ/2·f of them), as a fraction of the dense FFN's FLOPs:

    m·(|R ∪ C| - n_keep) / ((m + 1)·f)  =  γ/3 (gated)   or   γ/4 (plain)   -- for every d, f, b and r.

Outside the main domain the band is clipped: for r < γ/2 every channel is in R ∪ C (P is empty,
overhead 2r/3 for gated), for r > 1 - γ/2 R is empty. ``sizes_general()`` gives those as Piecewise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from typing import Sequence

from pop_fx.partition import PartitionSizes, partition_sizes

d, f, b = sympy.symbols("d f b", positive=True, integer=True)
r, gamma = sympy.symbols("r γ", nonnegative=True)
n_keep_s, n_rc_s = sympy.symbols("n_keep n_RC", nonnegative=True, integer=True)
SYMBOLS: dict[str, sympy.Symbol] = {"d": d, "f": f, "r": r, "gamma": gamma, "b": b}

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2}

# The paper's reported candidate-region overhead at γ = 0.1 and 20% total reduction (for comparison only).
PAPER_OVERHEAD = {"Llama2-7B": 0.0285, "Llama3.1-8B": 0.0348}
# Decoder shapes of those models (public configs): the 20%-total FFN sparsity comes from pop_fx.tools.budget.
PAPER_SHAPES = {
    "Llama2-7B": dict(d_model=4096, d_ff=11008, n_layers=32, n_heads=32, n_kv_heads=32),
    "Llama3.1-8B": dict(d_model=4096, d_ff=14336, n_layers=32, n_heads=32, n_kv_heads=8),
}
DOMAIN = "γ/2 <= r <= 1 - γ/2 (otherwise see sizes_general(): the band is clipped at 0 or d_ff)"


def input_matrices(kind: str) -> int:
    """m: matrices read before the activation (gate + up for gated kinds, one for plain)."""
    if kind in ("gated", "fused_gated", "expert", "shared_expert"):
        return 2
    if kind == "plain":
        return 1
    raise ValueError(f"kind={kind!r} is invalid: allowed 'gated', 'fused_gated' or 'plain'")


def sizes() -> dict[str, sympy.Expr]:
    """n_keep, n_R, n_C, n_P and |R ∪ C| on the main domain (see DOMAIN)."""
    n_keep = (1 - r) * f
    n_R = (1 - r - gamma / 2) * f
    n_C = gamma * f
    return {"n_keep": sympy.expand(n_keep), "n_R": sympy.expand(n_R), "n_C": n_C,
            "n_P": sympy.expand(f - n_R - n_C), "n_RC": sympy.expand(n_R + n_C)}


@functools.cache
def sizes_general() -> dict[str, sympy.Expr]:
    """The same sizes for every 0 <= r < 1, 0 <= γ <= 2, as Piecewise (docs/spec.md's max/min clipping, unrounded)."""
    n_keep = (1 - r) * f
    n_R = f * sympy.Max(0, 1 - r - gamma / 2)
    n_C = f * sympy.Min(gamma, 1 - sympy.Max(0, 1 - r - gamma / 2))
    out = {"n_keep": n_keep, "n_R": n_R, "n_C": n_C, "n_P": f - n_R - n_C, "n_RC": n_R + n_C}
    return {k: sympy.piecewise_fold(v.rewrite(sympy.Piecewise)) for k, v in out.items()}


def _costs(m: int, n_keep, n_rc, bytes_per: sympy.Expr | int) -> dict[str, sympy.Expr]:
    return {
        "dense_flops": 2 * b * d * f * (m + 1),
        "pop_flops": 2 * b * d * (m * n_rc + n_keep),
        "static_flops": 2 * b * d * (m + 1) * n_keep,
        "dense_bytes": bytes_per * d * f * (m + 1),
        "pop_bytes": bytes_per * d * (m * n_rc + n_keep),
    }


@functools.cache
def expressions(kind: str = "gated") -> dict[str, sympy.Expr]:
    """Per-decode-step costs of one FFN of ``kind`` on the main domain, simplified.

    Keys: dense_flops, pop_flops, static_flops (γ = 0, same n_keep), dense_bytes, pop_bytes (s = bytes per
    element), flops_ratio (POP / dense), bytes_ratio, overhead (candidate region, fraction of dense FLOPs).
    """
    m = input_matrices(kind)
    s = sympy.Symbol("s", positive=True)
    z = sizes()
    c = _costs(m, z["n_keep"], z["n_RC"], s)
    out = {k: sympy.factor(sympy.simplify(v)) for k, v in c.items()}
    out["flops_ratio"] = sympy.simplify(c["pop_flops"] / c["dense_flops"])
    out["bytes_ratio"] = sympy.simplify(c["pop_bytes"] / c["dense_bytes"])
    out["overhead"] = sympy.simplify((c["pop_flops"] - c["static_flops"]) / c["dense_flops"])
    return out


@functools.cache
def proxy_expressions(kind: str = "gated", proxy: str = "int8") -> dict[str, sympy.Expr]:
    """Weight bytes per decode step with proxy-scored candidates (``PopConfig.candidate_proxy``), main domain.

    Exact gate/up and down over the n_keep active channels (``s`` bytes per element), plus the proxy rows of
    every candidate (q bits per element: 8 for "int8"/"int8-gate", 3 for "int3"; gate and up, or the gate
    alone for "int8-gate"):

        proxy_bytes = s·d·(m + 1)·n_keep + (q/8)·d·m_p·n_C

    Keys: proxy_bytes, bytes_ratio (to dense). The per-row scales (4·m_p·n_C bytes) are O(f), not counted.
    """
    from pop_fx.lowbit import BITS, VALUES

    m = input_matrices(kind)
    if proxy not in BITS:
        raise ValueError(f"proxy={proxy!r} is invalid: allowed one of {list(BITS)}")
    if proxy == VALUES:
        return values_expressions(kind)
    mp = 1 if proxy == "int8-gate" else m
    s = sympy.Symbol("s", positive=True)
    z = sizes()
    pb = s * d * (m + 1) * z["n_keep"] + sympy.Rational(BITS[proxy], 8) * d * mp * z["n_C"]
    return {"proxy_bytes": sympy.factor(sympy.expand(pb)),
            "bytes_ratio": sympy.simplify(pb / _costs(m, z["n_keep"], z["n_RC"], s)["dense_bytes"])}


@functools.cache
def values_expressions(kind: str = "gated", batch_one: bool = True) -> dict[str, sympy.Expr]:
    """Weight bytes per decode step of ``candidate_proxy="int8-values"`` (``pop::values_decode``), main domain.

    What the op reads: the int8 gate/up rows of EVERY channel (1 byte per element; the static table is read whole,
    so under γ < 2 the P channels' rows too) with their bf16 scales (2 bytes per row), and the exact down rows of
    the n_keep chosen channels at batch 1 (``embedding_bag`` over the channel-major copy), of all f channels at
    batch > 1 (the masked dense down):

        values_bytes = d·m·f + 2·m·f + s·d·n_keep      (batch 1; s·d·f for the down at batch > 1)

    Keys: values_bytes, bytes_ratio (to dense). No exact gate/up row is read.
    """
    m = input_matrices(kind)
    s = sympy.Symbol("s", positive=True)
    z = sizes()
    down = z["n_keep"] if batch_one else f
    vb = d * m * f + 2 * m * f + s * d * down
    return {"values_bytes": sympy.factor(sympy.expand(vb)), "proxy_bytes": sympy.factor(sympy.expand(vb)),
            "bytes_ratio": sympy.simplify(vb / _costs(m, z["n_keep"], z["n_RC"], s)["dense_bytes"])}


def proxy_site_bytes(kind: str, d_model: int, d_ff: int, sparsity: float, candidate_ratio: float,
                     proxy: str = "int8", bytes_per_element: int = 4) -> int:
    """``proxy_bytes`` with the rounded sizes the backend uses (exact n_keep channels + proxy rows of C)."""
    expr = proxy_expressions(kind, proxy)["proxy_bytes"]
    sz = partition_sizes(d_ff, sparsity, candidate_ratio)
    # the rounded sizes stand for the unrounded ones: n_keep = (1-r)·f and n_C = γ·f
    vals = {d: d_model, f: d_ff, r: 1 - sympy.Rational(sz.n_keep, d_ff), gamma: sympy.Rational(sz.n_C, d_ff),
            sympy.Symbol("s", positive=True): bytes_per_element}
    return int(sympy.ceiling(expr.subs(vals)))


def budget_bytes(kind: str, d_model: int, sizes: "Sequence[PartitionSizes]", bytes_per_element: int = 4) -> int:
    """FFN weight bytes one decode step reads over sites of one kind and d_model, each with its own partition sizes:
    a layer-adaptive budget (``PopConfig.budget``, ``pop_fx.allocation``) gives each site its own n_keep.

        bytes = Σ_sites s·d·(m·|R ∪ C| + n_keep),   |R ∪ C| = n_keep + (n_C - n_select)

    Every bucket of ``allocation.bucket_keeps`` has the uniform n_C and n_select, so bytes are linear in n_keep
    with one slope, (m + 1)·s·d, and an allocation that keeps Σ n_keep reads exactly the uniform bytes (tested).
    """
    m = input_matrices(kind)
    return sum(bytes_per_element * d_model * (m * (sz.n_R + sz.n_C) + sz.n_keep) for sz in sizes)


@functools.cache
def overhead_derived(kind: str = "gated") -> sympy.Expr:
    """Candidate-region overhead for every r and γ, derived from ``sizes_general()`` (sympy's Piecewise)."""
    m = input_matrices(kind)
    z = sizes_general()
    return sympy.piecewise_fold(sympy.simplify(m * (z["n_RC"] - z["n_keep"]) / ((m + 1) * f)))


@functools.cache
def overhead_general(kind: str = "gated") -> sympy.Expr:
    """Candidate-region overhead (fraction of dense FFN FLOPs) for 0 <= r < 1, 0 <= γ <= 2, readable.

    r < γ/2: the band reaches past d_ff, every channel is computed (|R ∪ C| = f): m·r/(m+1).
    r <= 1 - γ/2: the main domain, m·γ/(2(m+1)).  Beyond: R is empty, |R ∪ C| = min(γ, 1)·f.
    Equal to ``overhead_derived`` (tested).
    """
    m = input_matrices(kind)
    k = sympy.Rational(m, m + 1)
    return sympy.Piecewise((k * r, r < gamma / 2), (k * gamma / 2, r <= 1 - gamma / 2),
                           (k * (r + sympy.Min(gamma, 1) - 1), True))


@dataclass(frozen=True)
class SiteCost:
    """Per-decode-step numbers of one FFN shape, from the exact (rounded) partition sizes."""

    kind: str
    d_model: int
    d_ff: int
    n_keep: int
    n_RC: int
    batch: int
    dense_flops: int
    pop_flops: int
    static_flops: int
    dense_bytes: dict[str, int]
    pop_bytes: dict[str, int]

    @property
    def overhead(self) -> float:
        """Candidate-region FLOPs (C ∖ S rows of gate/up) as a fraction of the dense FFN's."""
        return (self.pop_flops - self.static_flops) / self.dense_flops

    @property
    def flops_ratio(self) -> float:
        return self.pop_flops / self.dense_flops

    def as_dict(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "d_ff": self.d_ff, "n_keep": self.n_keep,
                "n_RC": self.n_RC, "batch": self.batch, "dense_flops": self.dense_flops, "pop_flops": self.pop_flops,
                "static_flops": self.static_flops, "dense_bytes": dict(self.dense_bytes),
                "pop_bytes": dict(self.pop_bytes), "overhead": self.overhead, "flops_ratio": self.flops_ratio}


def site_cost(kind: str, d_model: int, d_ff: int, sparsity: float, candidate_ratio: float, batch: int = 1) -> SiteCost:
    """The cost expressions evaluated with ``partition_sizes`` (the rounded sizes the backend really uses)."""
    m = input_matrices(kind)
    sz = partition_sizes(d_ff, sparsity, candidate_ratio)
    n_rc = sz.n_R + sz.n_C
    vals = {d: d_model, f: d_ff, b: batch}
    flops = {k: int(v.subs(vals)) for k, v in _costs(m, sz.n_keep, n_rc, 1).items() if k.endswith("flops")}
    by = {k: {p: int(_costs(m, sz.n_keep, n_rc, s)[k].subs(vals)) for p, s in BYTES_PER_ELEMENT.items()}
          for k in ("dense_bytes", "pop_bytes")}
    return SiteCost(kind, d_model, d_ff, sz.n_keep, n_rc, batch, flops["dense_flops"], flops["pop_flops"],
                    flops["static_flops"], by["dense_bytes"], by["pop_bytes"])


def evaluate(expr: sympy.Expr, *, d_model: int, d_ff: int, sparsity: float, candidate_ratio: float,
             batch: int = 1, bytes_per_element: int = 4) -> float:
    """An expression of this module at one point (unrounded sizes: differs from site_cost by < 2 channels)."""
    s = sympy.Symbol("s", positive=True)
    vals = {d: d_model, f: d_ff, r: sympy.nsimplify(sparsity), gamma: sympy.nsimplify(candidate_ratio), b: batch,
            s: bytes_per_element}
    return float(expr.subs(vals))


def paper_comparison(candidate_ratio: float = 0.1, total_reduction: float = 0.2) -> list[dict]:
    """Our overhead next to the paper's for Llama2-7B and Llama3.1-8B (a comparison, not a target).

    r is the FFN sparsity that removes ``total_reduction`` of the decoder parameters (pop_fx.tools.budget), as in the
    paper's Table 8. Besides our measure (fraction of dense FFN FLOPs), two other plausible denominators are
    listed: the static-mask FFN of the same n_keep, and all matmul FLOPs of a decoder layer (attention
    projections + FFN; the attention scores depend on the context length and are left out).
    """
    from pop_fx.tools.budget import ffn_sparsity_for_total

    rows = []
    for name, shp in PAPER_SHAPES.items():
        sparsity = ffn_sparsity_for_total(total_reduction, **shp)
        c = site_cost("gated", shp["d_model"], shp["d_ff"], sparsity, candidate_ratio)
        dm, nh, nkv = shp["d_model"], shp["n_heads"], shp["n_kv_heads"]
        hd = dm // nh
        attn_flops = 2 * (2 * dm * nh * hd + 2 * dm * nkv * hd)
        extra = c.pop_flops - c.static_flops
        rows.append({
            "model": name, "d_model": dm, "d_ff": shp["d_ff"], "sparsity": sparsity, "gamma": candidate_ratio,
            "paper": PAPER_OVERHEAD[name],
            "ours_dense_ffn": c.overhead,
            "symbolic": float(expressions("gated")["overhead"].subs(gamma, sympy.nsimplify(candidate_ratio))),
            "vs_static_ffn": extra / c.static_flops,
            "vs_decoder_layer": extra / (c.dense_flops + attn_flops),
        })
    return rows


PAPER_NOTE = "orientation, not a target; why ours (γ/3 of the dense FFN) differs: docs/design.md, \"Cost model\""


__all__ = ["BYTES_PER_ELEMENT", "DOMAIN", "budget_bytes", "PAPER_NOTE", "PAPER_OVERHEAD", "PAPER_SHAPES", "SYMBOLS", "SiteCost",
           "evaluate", "expressions", "input_matrices", "overhead_derived", "overhead_general", "paper_comparison", "site_cost",
           "sizes", "sizes_general"]
