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

* ``pop::proxy_select`` (this file) — proxy activations of C and the top-n_select positions within C;
* ``pop::gather_in``    (gather_in.py) — exact gate/up rows of R (contiguous) and of the chosen candidates;
* ``pop::decode_sel``   (decode_sel.py) — the down projection over R ∪ chosen.

The copies themselves are made in ``pop_fx.lowbit``. On CUDA (int8 and int3 alike) the op's scores come from
``proxy_kernels.proxy_scores_triton``: one fused Triton kernel reads the gate and up rows of each candidate from
the proxy copy (gathered, no copy), reduces over d with fp32 accumulation, applies the row scales, the
activation, the product and POP's score (a second small kernel finishes when K is split) and writes the scores'
``partition.rank_keys``; the selection is ``torch.topk`` over them, as ``candidate_topk``. The CPU body below
is unchanged. Its two implementations are ``pop_fx.autotune`` choices (``torch``, ``triton_fused`` on CUDA); the
``kernels`` argument (added last, defaulting to "Inductor measures") pins one; eagerly and without an autotuner
CUDA runs the fused kernel, as it always has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import autotune
from pop_fx.activations import activation
from pop_fx.ops.proxy_kernels import proxy_scores_triton
from pop_fx.ops.rows_gemv import on_cuda
from pop_fx.partition import candidate_topk


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

def proxy_select_triton(x2: Tensor, q: Tensor, s: Tensor, c_idx: Tensor, wd_norm_c: Tensor, n_select: int, d_ff: int,
                        act: int, launch=None) -> Tensor:
    """The CUDA body: the fused scoring kernel writes the [n_C] scores' ``rank_keys``, then ``candidate_topk``'s
    ``torch.topk`` over them (the same set: docs/spec.md's tie-break)."""
    keys = proxy_scores_triton(x2, q, s, c_idx, wd_norm_c, d_ff, act, launch=launch, keys=True)
    return torch.topk(keys, n_select, dim=-1, sorted=False).indices


def proxy_select_torch(x: Tensor, q: Tensor, s: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int,
                       d_ff: int, act: int) -> Tensor:
    """The torch body (the CPU's only implementation: Inductor fuses the row gathers into its reduction loops)."""
    x2 = x.reshape(-1, x.shape[-1])
    h_c = proxy_activation(x2, q, s, rc_idx[0, n_R:], d_ff, act, both=q.shape[0] == 2 * d_ff)
    return candidate_topk(h_c, wd_norm_c, n_select)


def _triton(x, q, s, rc_idx, wd_norm_c, n_R, n_select, d_ff, act):
    return proxy_select_triton(x.reshape(-1, x.shape[-1]), q, s, rc_idx[0, n_R:], wd_norm_c, n_select, d_ff, act,
                               launch=torch.library.wrap_triton)


def _index_inputs(a):
    return {"rc_idx": lambda shape, dtype, device: torch.arange(shape[-1], device=device).expand(*shape).to(dtype)}


CHOICES = autotune.register("pop::proxy_select", [
    autotune.Choice("torch", proxy_select_torch),
    autotune.Choice("triton_fused", _triton, "triton", lambda a: on_cuda(a["x"])),
], lambda code, a, lowering: "triton_fused" if code != autotune.TORCH and on_cuda(a["x"]) else "torch",
    _index_inputs)


@torch.library.custom_op("pop::proxy_select", mutates_args=())
def proxy_select(x: Tensor, q: Tensor, s: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int,
                 d_ff: int, act: int, kernels: int = 2) -> Tensor:
    """Positions within C ([n_select], int64) of the candidates this step computes, ranked by the proxy."""
    return autotune.run("pop::proxy_select", dict(x=x, q=q, s=s, rc_idx=rc_idx, wd_norm_c=wd_norm_c, n_R=n_R,
                                                  n_select=n_select, d_ff=d_ff, act=act, kernels=kernels))


@proxy_select.register_fake
def _(x, q, s, rc_idx, wd_norm_c, n_R, n_select, d_ff, act, kernels=2):
    autotune.install()  # tracing reaches the fake before Inductor lowers the op: its lowering is in place
    return rc_idx.new_empty(n_select)


__all__ = ["CHOICES", "proxy_activation", "proxy_select", "proxy_select_torch", "proxy_select_triton"]
