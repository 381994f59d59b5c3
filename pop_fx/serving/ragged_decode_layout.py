"""DECODE rows of a ragged step through their slot's own R ∪ C layout (``layouts=True``).

    gu     = w_in[s] · x[t]                      # gate rows then up rows of R_s ∪ C_s, s = slot[t]
    h      = act(gu_gate) ⊙ gu_up
    y[t]   = wd_rc[s] · (h ⊙ [1_R, 1_{S_t}])     # R plus the row's own top candidates, one GEMV

The option for a stated memory budget: every slot holds a compact copy of its R ∪ C rows
(``(n_R + n_C) / d_ff`` of the FFN's bytes per slot), so a decode row reads only its slot's contiguous rows,
the layout that made ``pop_fx.compile``'s decode fast on this CPU (DESIGN_NOTES: gathers per step cost more
than dense).

``ragged_decode_grouped`` is plain torch with fixed shapes and no host read, so the compiled decode step
traces it: the rows are sorted by slot and each of the two projections is ONE grouped GEMV over the slots'
layouts (``pop::grouped_gemv``: ``torch._grouped_mm`` on the CPU, the experts op's pair kernel on CUDA), and
Inductor fuses the activation, the candidate scoring and the mask into its own kernels around them (as in
``pop::decode``). Rows that are not DECODE come back as zeros (the caller computes them dense).
``ragged_decode_layout_reference`` is the per-row loop it replaced (host reads), kept as the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.activations import activation
from pop_fx.ops.decode import decode_reference
from pop_fx.ops.experts_decode import layout_decode_grouped
from pop_fx.serving.phases import DECODE


def slot_offsets(sorted_slots: Tensor, num_slots: int) -> Tensor:
    """[num_slots] int32 end of each slot's run in ``sorted_slots`` (the ``offs`` of a grouped GEMV; a binary
    search: no scatter, no host sync)."""
    slots = torch.arange(num_slots, device=sorted_slots.device, dtype=sorted_slots.dtype)
    return torch.searchsorted(sorted_slots, slots, right=True, out_int32=True)


def ragged_decode_grouped(x: Tensor, slot: Tensor, phase: Tensor, w_in: Tensor, wd_rc: Tensor, wd_norm_c: Tensor,
                          n_R: int, n_select: int, act: int, order: Tensor | None = None,
                          inverse: Tensor | None = None) -> Tensor:
    """x [T, d] -> [T, d_out]: each DECODE row through its slot's layout (module docstring), others 0.

    ``order`` (the rows sorted by slot, stable) and ``inverse`` (its inverse permutation) are computed here
    unless given: ``StepInfo.set`` computes them once per step for every layer."""
    if order is None or inverse is None:
        order = torch.argsort(slot, stable=True)
        inverse = torch.argsort(order)
    s = slot.index_select(0, order)
    y = layout_decode_grouped(x.index_select(0, order), w_in, wd_rc, s, slot_offsets(s, w_in.shape[0]),
                              wd_norm_c.index_select(0, s), n_R, n_select, activation(act))
    y = y.index_select(0, inverse)
    return torch.where((phase == DECODE)[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def ragged_decode_layout_reference(x: Tensor, slot: Tensor, phase: Tensor, w_in: Tensor, wd_rc: Tensor,
                                   wd_norm_c: Tensor, n_R: int, n_select: int, act: int) -> Tensor:
    """The per-row loop (host reads of ``slot`` and ``phase``): the oracle ``ragged_decode_grouped`` equals."""
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


__all__ = ["ragged_decode_grouped", "ragged_decode_layout_reference", "slot_offsets"]
