"""``pop::ragged_prefill``: a serving step's prefill rows into their slots' state; partitions fixed on last chunks.

An engine's step is one flat batch ``h [T, d_ff]`` mixing requests; ``slot [T]`` names each row's request slot,
``acc [T]`` (bool) the rows whose h² adds to their slot's running Σh² (every prefill chunk, the last included)
and ``last [T]`` (bool) the rows of a request's last prompt chunk (``pop_fx.serving`` derives both from its row
phases; the op knows nothing about phases). Per slot the state keeps a running Σ_t h[t, j]² over every prefill
chunk seen so far (fp64, so chunking changes the sum by less than one fp32 rounding of its square root), and for
each slot named by a ``last`` row the partition is fixed from it after this step's rows are added:

    I_j  = sqrt(Σh²_j) · ||Wd[:, j]||          # = Eq. 3 over the whole prompt, however it was chunked
    R, C = partition.split(I, sizes)             # rc_idx[slot] = [R | C], wd_norm_c[slot] = ||Wd[:, C]||

With per-slot layouts (``w_in``/``wd_rc`` not empty) the slot's R ∪ C rows of gate/up and columns of down are
copied out as well (``pop_fx.ops.layout``, the same copies ``pop::prefill`` makes for one batch).

Only slots named by a ``last`` row are touched, so no slot's state reaches another. The body finds those slots
with ``unique`` (a host sync): engines run decode-only steps without this op (``pop_fx.serving`` calls it
only when the step has a prefill row), so CUDA-graph-captured decode batches never contain it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx import partition as P
from pop_fx.ops.layout import gather_columns, write_in_layout


def accumulate(h: Tensor, slot: Tensor, acc: Tensor, sumsq: Tensor) -> None:
    """sumsq[slot[t]] += h[t]² for the rows t flagged by ``acc``; NaN counts as 0 (as in Eq. 3)."""
    hf = h.detach().to(sumsq.dtype)
    hf = torch.where(acc[:, None] & ~torch.isnan(hf), hf, torch.zeros((), dtype=hf.dtype, device=hf.device))
    sumsq.index_add_(0, slot, hf * hf)


def fix_partitions(slots: Tensor, sumsq: Tensor, wd_norm: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                   sizes: P.PartitionSizes, w_gate: Tensor, w_up: Tensor, wd: Tensor, w_in: Tensor,
                   b_in: Tensor, wd_rc: Tensor) -> None:
    """Partition each of ``slots`` from its accumulated Σh² and write its indices (and layouts) in place."""
    if slots.numel() == 0:
        return
    scores = sumsq[slots].sqrt().to(torch.float32) * wd_norm
    part = P.split(scores, sizes)
    rc = torch.cat([part.R, part.C], dim=-1)
    rc_idx[slots] = rc
    wd_norm_c[slots] = wd_norm[part.C]
    if w_in.numel():
        d_ff = wd.shape[1]
        for i, s in enumerate(slots.tolist()):
            write_in_layout(rc[i], d_ff, w_gate, None, w_up, None, 0, w_in[s], b_in[s])
            gather_columns(wd, rc[i], wd_rc[s, :, : rc.shape[-1]])


@torch.library.custom_op("pop::ragged_prefill", mutates_args=("sumsq", "rc_idx", "wd_norm_c", "w_in", "b_in", "wd_rc"))
def ragged_prefill(h: Tensor, slot: Tensor, acc: Tensor, last: Tensor, wd_norm: Tensor, sumsq: Tensor, rc_idx: Tensor,
                   wd_norm_c: Tensor, w_gate: Tensor, w_up: Tensor, wd: Tensor, w_in: Tensor, b_in: Tensor,
                   wd_rc: Tensor, n_keep: int, n_R: int, n_C: int) -> None:
    accumulate(h, slot, acc, sumsq)
    d_ff = h.shape[-1]
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    fix_partitions(torch.unique(slot[last]), sumsq, wd_norm, rc_idx, wd_norm_c, sizes, w_gate, w_up, wd, w_in, b_in, wd_rc)


@ragged_prefill.register_fake
def _(h, slot, acc, last, wd_norm, sumsq, rc_idx, wd_norm_c, w_gate, w_up, wd, w_in, b_in, wd_rc, n_keep, n_R, n_C):
    return None


__all__ = ["accumulate", "fix_partitions", "ragged_prefill"]
