"""``pop::ragged_decode_layout``: DECODE rows of a ragged step through their slot's own R ∪ C layout.

    gu     = w_in[s] · x[t]                      # gate rows then up rows of R_s ∪ C_s, s = slot[t]
    h      = act(gu_gate) ⊙ gu_up
    y[t]   = pop::decode's math on wd_rc[s]      # R plus the step's top candidates, one GEMV

The option for a stated memory budget: every slot holds a compact copy of its R ∪ C rows
(``(n_R + n_C) / d_ff`` of the FFN's bytes per slot), so a decode row reads only its slot's contiguous rows,
the layout that made ``pop_fx.compile``'s decode fast on this CPU (DESIGN_NOTES: gathers per step cost more
than dense). Rows that are not DECODE come back as zeros (the caller computes them dense). The body loops
over the DECODE rows (a host read of ``slot``): one GEMV pair per row, which at concurrency N reads N
layouts; README "Serving" measures when that beats one dense read of the shared weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.activations import activation
from pop_fx.ops.decode import decode_reference
from pop_fx.serving.phases import DECODE


def ragged_decode_layout_reference(x: Tensor, slot: Tensor, phase: Tensor, w_in: Tensor, wd_rc: Tensor,
                                   wd_norm_c: Tensor, n_R: int, n_select: int, act: int) -> Tensor:
    n_rc = w_in.shape[1] // 2
    fn = activation(act)
    y = x.new_zeros(x.shape[0], wd_rc.shape[1])
    slots = slot.tolist()
    for t in (phase == DECODE).nonzero().flatten().tolist():
        s = slots[t]
        gu = F.linear(x[t : t + 1], w_in[s])
        h = fn(gu[:, :n_rc]) * gu[:, n_rc:]
        y[t] = decode_reference(h, wd_rc[s], None, wd_norm_c[s], n_R, n_select)[0]
    return y


@torch.library.custom_op("pop::ragged_decode_layout", mutates_args=())
def ragged_decode_layout(x: Tensor, slot: Tensor, phase: Tensor, w_in: Tensor, wd_rc: Tensor, wd_norm_c: Tensor,
                         n_R: int, n_select: int, act: int) -> Tensor:
    return ragged_decode_layout_reference(x, slot, phase, w_in, wd_rc, wd_norm_c, n_R, n_select, act)


@ragged_decode_layout.register_fake
def _(x, slot, phase, w_in, wd_rc, wd_norm_c, n_R, n_select, act):
    return x.new_empty(x.shape[0], wd_rc.shape[1])


__all__ = ["ragged_decode_layout", "ragged_decode_layout_reference"]
