"""Decode-step down projection over R ∪ selected candidates: ``pop::decode`` (scope="batch").

    S_t     = top_{n_select}( ||h[:, n_R + s]||_rows · ||Wd[:, C_s]|| )     (candidate scoring, one per step)
    y[b, :] = Wd_rc · (h[b] ⊙ [1_R, 1_{S_t}])  (+ bias)                       (one GEMV over the R ∪ C layout)

``h`` holds the step's activation over the R ∪ C layout (R first, then C) and ``wd_rc`` the down
projection's R ∪ C columns in ``nn.Linear``'s layout ([d_out, n_R + n_C]), written by the prefill.
Zeroing the unselected candidates and running one GEMV reads γ/2·d_ff more columns than a gather would,
but never copies weights, and on a GPU a row-major gather of half the C band touches nearly every sector
of it anyway.

Implementations, one contract (each a ``pop_fx.autotune.Choice``; under ``kernels="auto"`` Inductor benchmarks
those that serve the step's inputs and inlines the fastest, see ``pop_fx/autotune.py``):

* ``masked`` — ``decode_reference``, plain torch: candidate top-k over ``partition.rank_keys`` (docs/spec.md's
  tie-break), the mask, ``F.linear`` over the whole R ∪ C layout. Today's dispatch for the torch family.
* ``gather_mm`` — a GEMV over R, then the selected candidates' columns gathered (``index_select``: a copy of
  n_select columns) and one GEMM over them. Reads γ/2·d_ff fewer columns, but gathers them from a row-major layout.
* ``gather_sum`` — a GEMV over R, then Σ_j h_j · Wd[:, j] over the selected columns written as a reduction
  Inductor fuses the gather into (no gathered copy; fp32 accumulation).
* ``masked_reduce`` — ``masked`` with the GEMV as one reduction over the R ∪ C columns (fp32 accumulation): the
  form Inductor's C++ backend streams near memory speed at batch 1 (``pop_fx/ops/linear.py``).
* ``triton_splitk`` (CUDA, ``kernels="triton"``'s default) — ``select_mask_triton`` + ``gemv_triton``: one program
  ranks the n_C candidates and writes their 0/1 mask; a split-K GEMV streams ``wd_rc``, applying the mask as it
  loads h (no masked, padded or concatenated copy of h), and a finishing launch sums the splits, adds the bias and
  casts (see ``splitk_gemv.py``): three launches a step. A band wider than the select kernel sorts (n_C >
  SELECT_MAX, a 7B model at γ ≥ 0.58) is ranked by ``torch.topk`` instead, the GEMV unchanged. Batches up to
  ``BLOCK_B`` rows.
* ``pop::decode`` — a ``custom_op`` (opaque until Inductor lowers it: ``pop_fx.autotune`` inlines the chosen
  implementation's traced graph there, so scoring and masking still fuse with their neighbours); run eagerly, it
  calls today's dispatch for its ``kernels`` code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import autotune
from pop_fx.ops.splitk_gemv import BLOCK_B, gemv_triton, select_fits, select_mask_triton, triton
from pop_fx.partition import candidate_topk


def candidate_mask(h_c: Tensor, wd_norm_c: Tensor, n_select: int, per_sequence: bool = False) -> Tensor:
    """0/1 in h's dtype over C ([n_C], or [B, n_C] per sequence): the candidates this step computes."""
    sel = candidate_topk(h_c, wd_norm_c, n_select, per_sequence)
    shape = h_c.shape if per_sequence else h_c.shape[-1:]
    return torch.zeros(shape, dtype=h_c.dtype, device=h_c.device).scatter_(-1, sel, 1)


def decode_reference(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                     n_select: int, gemv=F.linear) -> Tensor:
    """The masked GEMV: unselected candidates zeroed, one ``gemv(h, wd_rc, bd)`` over the R ∪ C layout."""
    lead = h_rc.shape[:-1]
    h2 = h_rc.reshape(-1, h_rc.shape[-1])
    n_C = h2.shape[-1] - n_R
    wd_rc = wd_rc[:, : n_R + n_C]  # the layout's rows are padded (layout.ROW_ALIGN)
    if n_select == 0:  # the static mask (γ = 0): R only
        h2, wd_rc = h2[:, :n_R], wd_rc[:, :n_R]
    elif n_select < n_C:
        h2 = torch.cat([h2[:, :n_R], h2[:, n_R:] * candidate_mask(h2[:, n_R:], wd_norm_c, n_select)], dim=-1)
    y = gemv(h2, wd_rc, bd)
    return y.reshape(*lead, wd_rc.shape[0])


def decode_triton(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int,
                  launch=None) -> Tensor:
    """The Triton path: the select kernel's mask (``torch.topk``'s past SELECT_MAX candidates) fused into the
    split-K GEMV's load of h."""
    lead = h_rc.shape[:-1]
    h2 = h_rc.reshape(-1, h_rc.shape[-1])
    n_C = h2.shape[-1] - n_R
    mask = None
    if 0 < n_select < n_C:
        if select_fits(n_C):
            mask = select_mask_triton(h2, wd_norm_c.reshape(-1), n_R, n_select, launch=launch)
        else:
            mask = candidate_mask(h2[:, n_R:], wd_norm_c.reshape(-1), n_select)
    elif n_select == 0:
        h2 = h2[:, :n_R]  # a view: the C columns read as zeros, the GEMV still streams the padded layout
    y = gemv_triton(h2, wd_rc, launch=launch, mask=mask, n_R=n_R, bias=bd)  # loads vectorize to 16-element rows
    return y.reshape(*lead, wd_rc.shape[0])


def triton_serves(h2: Tensor) -> bool:
    """Whether the Triton kernels take this step: a CUDA tensor, Triton installed, at most ``BLOCK_B`` rows (the
    split-K GEMV pads the batch to one BLOCK_B-row block and reads the weights once for all of them)."""
    return h2.device.type == "cuda" and triton is not None and h2.shape[0] <= BLOCK_B


def _rows(h: Tensor) -> Tensor:
    return h.reshape(-1, h.shape[-1])


def decode_gather_mm(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                     n_select: int) -> Tensor:
    """R's GEMV plus the selected candidates' columns gathered, then one GEMM over them."""
    h2 = _rows(h_rc)
    n_C = h2.shape[-1] - n_R
    y = F.linear(h2[:, :n_R], wd_rc[:, :n_R], bd)
    if n_select:
        cols = n_R + (candidate_topk(h2[:, n_R:], wd_norm_c, n_select) if n_select < n_C
                      else torch.arange(n_C, device=h2.device))
        y = y + F.linear(h2.index_select(1, cols), wd_rc.index_select(1, cols))
    return y.reshape(*h_rc.shape[:-1], wd_rc.shape[0])


def decode_gather_sum(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                      n_select: int) -> Tensor:
    """R's GEMV plus Σ_j h_j · Wd[:, j] over the selected columns as one reduction (the gather fuses into it)."""
    h2 = _rows(h_rc)
    n_C = h2.shape[-1] - n_R
    y = F.linear(h2[:, :n_R], wd_rc[:, :n_R], bd)
    if n_select:
        cols = n_R + (candidate_topk(h2[:, n_R:], wd_norm_c, n_select) if n_select < n_C
                      else torch.arange(n_C, device=h2.device))
        w = wd_rc.index_select(1, cols).float()  # [d_out, k]: Inductor reads it inside the reduction, no copy
        y = (y.float() + (w[None] * h2.index_select(1, cols).float()[:, None, :]).sum(-1)).to(h2.dtype)
    return y.reshape(*h_rc.shape[:-1], wd_rc.shape[0])


def decode_masked_reduce(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                         n_select: int) -> Tensor:
    """``masked`` with its GEMV written as a reduction (``pop_fx.ops.linear.linear_reduce``: fp32 accumulation),
    which Inductor's C++ backend streams near memory speed at batch 1 where ATen's GEMV does not."""
    from pop_fx.ops.linear import linear_reduce

    return decode_reference(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select, gemv=linear_reduce)


def _masked(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select):
    return decode_reference(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select)  # by name: tests may replace it


def _triton(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select):
    return decode_triton(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select, launch=torch.library.wrap_triton)


def _default(code: int, a, lowering: bool) -> str:
    """Today's dispatch: the torch path, the Triton kernels under ``kernels="triton"`` where they serve."""
    return "triton_splitk" if code == autotune.TRITON and triton_serves(_rows(a["h_rc"])) else "masked"


CHOICES = autotune.register("pop::decode", [
    autotune.Choice("masked", _masked),
    autotune.Choice("gather_mm", decode_gather_mm),
    autotune.Choice("gather_sum", decode_gather_sum),
    autotune.Choice("masked_reduce", decode_masked_reduce),
    autotune.Choice("triton_splitk", _triton, "triton", lambda a: triton_serves(_rows(a["h_rc"])), any_size=False),
], _default)


@torch.library.custom_op("pop::decode", mutates_args=())
def decode(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int,
           kernels: int = 0) -> Tensor:
    return autotune.run("pop::decode", dict(h_rc=h_rc, wd_rc=wd_rc, bd=bd, wd_norm_c=wd_norm_c, n_R=n_R,
                                            n_select=n_select, kernels=kernels))


@decode.register_fake
def _(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select, kernels=0):
    autotune.install()  # tracing reaches the fake before Inductor lowers the op: its lowering is in place
    return h_rc.new_empty(*h_rc.shape[:-1], wd_rc.shape[0])


__all__ = ["CHOICES", "candidate_mask", "decode", "decode_gather_mm", "decode_gather_sum", "decode_masked_reduce",
           "decode_reference", "decode_triton", "triton_serves"]
