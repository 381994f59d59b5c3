"""The prefill-time layout step: R ∪ C rows of gate/up and columns of down, copied contiguously.

Done once per prompt, into buffers the backend owns (the user's Parameters are never modified):

* ``w_in`` [n_in·(n_R+n_C), d_model] — gate rows then up rows of R ∪ C (one GEMV per decode step);
* ``wd_t`` [n_R+n_C, d_out] — the down projection's R ∪ C columns, channel-major, so a decode step
  reads contiguous rows for R and gathers only the selected candidates' rows.

The copy is a gather bounded by memory bandwidth: ``index_select`` is already one pass over the
source rows on every device, so this op has no Triton kernel of its own.

Layout flags (a bit set): FUSED — ``w_a`` holds gate rows [0, d_ff) and up rows [d_ff, 2·d_ff)
(Phi-3's gate_up_proj); CONV1D — weights are stored [in, out] (GPT-2's Conv1D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import partition as P

FUSED = 1
CONV1D = 2


def _rows(w: Tensor, flags: int) -> Tensor:
    """The weight as [channels(or 2·channels), in]: Conv1D stores it transposed."""
    return w.t() if flags & CONV1D else w


def in_rows(d_ff: int, idx: Tensor, flags: int) -> Tensor:
    """Rows of the (fused) input weight that hold channels ``idx``."""
    if flags & FUSED:
        return torch.cat([idx, idx + d_ff], dim=-1)
    return idx


def _layout_in(idx: Tensor, d_ff: int, w_a: Tensor, b_a: Tensor | None, w_b: Tensor | None, b_b: Tensor | None, flags: int):
    """Gate/up rows of channels ``idx`` as one [n_in·|idx|, d] matrix and its bias (zeros if none)."""
    wa = _rows(w_a, flags)
    rows = in_rows(d_ff, idx, flags)
    ws = [wa.index_select(0, rows)]
    bs = [b_a.index_select(0, rows) if b_a is not None else wa.new_zeros(rows.numel())]
    if w_b is not None:
        ws.append(_rows(w_b, flags).index_select(0, idx))
        bs.append(b_b.index_select(0, idx) if b_b is not None else wa.new_zeros(idx.numel()))
    return torch.cat(ws, 0), torch.cat(bs, 0)


def write_partition(scores: Tensor, sizes: P.PartitionSizes, wd: Tensor, w_a: Tensor, b_a: Tensor | None,
                    w_b: Tensor | None, b_b: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                    w_in: Tensor, b_in: Tensor, wd_t: Tensor, flags: int) -> None:
    """Split ``scores`` ([d_ff], or [B, d_ff] per sequence) into R/C/P and write the site's state in place."""
    d_ff = scores.shape[-1]
    part = P.split(scores, sizes)
    rc = torch.cat([part.R, part.C], dim=-1)
    if scores.dim() == 2:  # per sequence: indices only, the original weights are gathered per step
        B = scores.shape[0]
        rc_idx[:B].copy_(rc)
        wd_norm_c[:B].copy_(wd_norm[part.C])
        return
    rc_idx.copy_(rc.expand_as(rc_idx))
    wd_norm_c.copy_(wd_norm[part.C].expand_as(wd_norm_c))
    if w_in.numel():
        wi, bi = _layout_in(rc, d_ff, w_a, b_a, w_b, b_b, flags)
        w_in.copy_(wi)
        b_in.copy_(bi)
        wd_t.copy_(wd.index_select(0, rc) if flags & CONV1D else wd.index_select(1, rc).t())
