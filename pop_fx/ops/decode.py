"""Decode-step down projection over R ∪ selected candidates: ``pop::decode`` (scope="batch").

    S_t     = top_{n_select}( ||h[:, n_R + s]||_rows · ||Wd[:, C_s]|| )     (candidate scoring, one per step)
    y[b, :] = Wd_rc · (h[b] ⊙ [1_R, 1_{S_t}])  (+ bias)                       (one GEMV over the R ∪ C layout)

``h`` holds the step's activation over the R ∪ C layout (R first, then C) and ``wd_rc`` the down
projection's R ∪ C columns in ``nn.Linear``'s layout ([d_out, n_R + n_C]), written by the prefill.
Zeroing the unselected candidates and running one GEMV reads γ/2·d_ff more columns than a gather would,
but never copies weights, and on a GPU a row-major gather of half the C band touches nearly every sector
of it anyway.

Implementations, one contract:

* ``decode_reference`` — plain torch: candidate top-k over ``partition.rank_keys`` (docs/spec.md's tie-break),
  the mask, ``F.linear``. The CPU path (Inductor traces it: scoring and masking fuse into one C++ loop, the
  GEMV is an extern oneDNN/BLAS call) and, until a GPU run has measured the Triton kernels, the CUDA default
  (cuBLAS's GEMV over the masked activations).
* ``select_mask_triton`` + ``gemv_triton`` (``kernels="triton"``) — one program ranks the n_C candidates and
  writes their 0/1 mask; a split-K GEMV streams ``wd_rc``, applying the mask as it loads h (no masked, padded or
  concatenated copy of h), and a finishing launch sums the splits, adds the bias and casts (see
  ``splitk_gemv.py``): three launches a step. A band wider than the select kernel sorts (n_C > SELECT_MAX, a 7B
  model at γ ≥ 0.58) is ranked by ``torch.topk`` instead, the GEMV unchanged. Batches up to ``BLOCK_B`` rows.
* ``pop::decode`` — a ``triton_op`` whose body branches on the device and on ``kernels``, so Inductor
  sees either the torch ops or the Triton kernels inside its generated code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.ops.splitk_gemv import BLOCK_B, gemv_triton, select_fits, select_mask_triton, triton
from pop_fx.partition import candidate_topk

KERNELS = ("torch", "triton")
"""``kernels`` argument of the decode ops: 0 = torch ops (the default everywhere), 1 = Triton kernels (CUDA)"""


def candidate_mask(h_c: Tensor, wd_norm_c: Tensor, n_select: int, per_sequence: bool = False) -> Tensor:
    """0/1 in h's dtype over C ([n_C], or [B, n_C] per sequence): the candidates this step computes."""
    sel = candidate_topk(h_c, wd_norm_c, n_select, per_sequence)
    shape = h_c.shape if per_sequence else h_c.shape[-1:]
    return torch.zeros(shape, dtype=h_c.dtype, device=h_c.device).scatter_(-1, sel, 1)


def decode_reference(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int,
                     n_select: int) -> Tensor:
    lead = h_rc.shape[:-1]
    h2 = h_rc.reshape(-1, h_rc.shape[-1])
    n_C = h2.shape[-1] - n_R
    wd_rc = wd_rc[:, : n_R + n_C]  # the layout's rows are padded (layout.ROW_ALIGN)
    if n_select == 0:  # the static mask (γ = 0): R only
        h2, wd_rc = h2[:, :n_R], wd_rc[:, :n_R]
    elif n_select < n_C:
        h2 = torch.cat([h2[:, :n_R], h2[:, n_R:] * candidate_mask(h2[:, n_R:], wd_norm_c, n_select)], dim=-1)
    y = F.linear(h2, wd_rc, bd)
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


@torch.library.triton_op("pop::decode", mutates_args=())
def decode(h_rc: Tensor, wd_rc: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int,
           kernels: int = 0) -> Tensor:
    if kernels == 1 and triton_serves(h_rc.reshape(-1, h_rc.shape[-1])):
        return decode_triton(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select, launch=torch.library.wrap_triton)
    return decode_reference(h_rc, wd_rc, bd, wd_norm_c, n_R, n_select)


__all__ = ["KERNELS", "candidate_mask", "decode", "decode_reference", "decode_triton", "triton_serves"]
