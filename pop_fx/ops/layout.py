"""The prefill-time layout step: R ∪ C rows of gate/up and columns of down, copied contiguously.

Done once per prompt, into buffers the backend owns (the user's Parameters are never modified):

* ``w_in`` [n_in·(n_R+n_C), d_model] — gate rows then up rows of R ∪ C (one GEMV per decode step);
* ``wd_rc`` [d_out, padded(n_R+n_C)] — the down projection's R ∪ C columns (then zeros up to a row stride
  of ``ROW_ALIGN`` elements), in ``nn.Linear``'s layout: a decode
  step's down projection is one GEMV over them with the unselected candidates' activations zeroed. (The
  transposed, channel-major layout made CPU bf16/fp16 matmuls fall off oneDNN's fast path: 56 ms instead of
  1.9 ms for one [1, 3097] x [3097, 2048] product, measured.)

The copy is a gather bounded by memory bandwidth, so this op has no Triton kernel of its own. Rows go
through ``index_select`` (one pass over the source rows); columns through ``gather_columns``: on the CPU
``index_select`` along the last dim is 5-7x slower than a ``gather`` over an index broadcast across the rows,
and a bf16 ``gather`` slower again than the same gather of the bits as int16 (``examples/copy_gemv_variants.py``:
1B down projection, 3099 of 5632 columns, fp32 27.3 -> 5.0 ms, bf16 28.1 -> 4.1 ms; 64 OLMoE experts' down,
bf16 344 -> 78 ms).

Layout flags (a bit set): FUSED — ``w_a`` holds gate rows [0, d_ff) and up rows [d_ff, 2·d_ff)
(Phi-3's gate_up_proj); CONV1D — weights are stored [in, out] (GPT-2's Conv1D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx import partition as P

FUSED = 1
CONV1D = 2
ROW_ALIGN = 16
"""``wd_rc``'s rows are padded to a multiple of this many elements: 32 bytes in bf16, so every row of the layout
starts on a 16-byte boundary (vectorized, pipelined GPU loads; Triton specializes such strides)."""


def padded(n: int) -> int:
    """n rounded up to ``ROW_ALIGN``: the row stride of a [d_out, n_R + n_C] layout."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """``t``'s storage seen as integers of its element size (a copy by index is then a copy of bits)."""
    b = _BITS.get(t.element_size()) if t.is_floating_point() else None
    return t.view(b) if b is not None else t


def gather_columns(src: Tensor, idx: Tensor, out: Tensor) -> None:
    """``out[..., r, j] = src[..., r, idx[..., j]]``: columns ``idx`` ([n], or [E, n] for a [E, rows, cols]
    ``src``) of every row, into ``out`` ([..., rows, n], any strides)."""
    index = idx.unsqueeze(-2).expand(*src.shape[:-1], idx.shape[-1])
    _bits(out).copy_(torch.gather(_bits(src), -1, index))


def gather_rows(src: Tensor, idx: Tensor, out: Tensor) -> None:
    """``out[e, j] = src[e, idx[e, j]]`` for a [E, rows, cols] ``src`` and [E, n] ``idx``, into a contiguous
    ``out`` [E, n, cols]: one ``index_select`` over the flattened rows (a ``gather`` with the index expanded
    over the columns reads the index as often as the weights)."""
    E, R = src.shape[:2]
    flat = (idx + torch.arange(E, device=idx.device)[:, None] * R).reshape(-1)
    torch.index_select(src.reshape(E * R, -1), 0, flat, out=out.view(-1, out.shape[-1]))


def weight_rows(w: Tensor, flags: int) -> Tensor:
    """The weight as [channels(or 2·channels), in]: Conv1D stores it transposed."""
    return w.t() if flags & CONV1D else w


def in_rows(d_ff: int, idx: Tensor, flags: int) -> Tensor:
    """Rows of the (fused) input weight that hold channels ``idx``."""
    if flags & FUSED:
        return torch.cat([idx, idx + d_ff], dim=-1)
    return idx


def write_in_layout(idx: Tensor, d_ff: int, w_a: Tensor, b_a: Tensor | None, w_b: Tensor | None,
                    b_b: Tensor | None, flags: int, w_in: Tensor, b_in: Tensor) -> None:
    """Gate/up rows of channels ``idx`` into ``w_in`` ([n_in·|idx|, d]) and their bias into ``b_in`` (0 if none).

    Gathers straight into the destination (``index_select(out=)``): no intermediate copy of the rows.
    """
    wa = weight_rows(w_a, flags)
    rows = in_rows(d_ff, idx, flags)
    n = rows.numel()
    torch.index_select(wa, 0, rows, out=w_in[:n])
    if b_a is not None:
        torch.index_select(b_a, 0, rows, out=b_in[:n])
    else:
        b_in[:n].zero_()
    if w_b is not None:
        torch.index_select(weight_rows(w_b, flags), 0, idx, out=w_in[n:])
        if b_b is not None:
            torch.index_select(b_b, 0, idx, out=b_in[n:])
        else:
            b_in[n:].zero_()


def kept_rows(sel: Tensor, n_R: int, n_rc: int, n_in: int) -> Tensor:
    """Layout rows of R then the chosen candidates, for each of the n_in input blocks."""
    keep = torch.cat([torch.arange(n_R, device=sel.device), n_R + sel])
    return torch.cat([keep + i * n_rc for i in range(n_in)])


def write_partition(scores: Tensor, sizes: P.PartitionSizes, wd: Tensor, w_a: Tensor, b_a: Tensor | None,
                    w_b: Tensor | None, b_b: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                    w_in: Tensor, b_in: Tensor, wd_rc: Tensor, flags: int) -> None:
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
        write_in_layout(rc, d_ff, w_a, b_a, w_b, b_b, flags, w_in, b_in)
        if flags & CONV1D:  # Conv1D stores Wd as [d_ff, d_out]: gather the rows, then one transposing copy
            wd_rc[:, : rc.numel()].copy_(wd.index_select(0, rc).t())
        else:  # [d_out, d_ff]: one column gather into the layout
            gather_columns(wd, rc, wd_rc[:, : rc.numel()])


def expert_in_rows(rc: Tensor, d_ff: int) -> Tensor:
    """Rows of gate_up [2I, H] that hold channels ``rc``: gate rows, then up rows."""
    return torch.cat([rc, rc + d_ff], dim=-1)


def write_expert_partition(e: int, scores: Tensor, dense_g: Tensor, sizes: P.PartitionSizes, gate_up: Tensor,
                           down: Tensor, wd_norm: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, dense: Tensor,
                           w_in: Tensor, wd_rc: Tensor) -> None:
    """Split ``scores`` [G', I] of expert ``e`` into R/C/P for groups 0..G'-1 and write the state in place."""
    d_ff = scores.shape[-1]
    G = scores.shape[0]
    part = P.split(scores, sizes)
    rc = torch.cat([part.R, part.C], dim=-1)  # [G, n_RC]
    rc_idx[e, :G].copy_(rc)
    wd_norm_c[e, :G].copy_(wd_norm[e][part.C])
    dense[e, :G].copy_(dense_g)
    if w_in.numel():  # scope="batch": one group, laid out contiguously for decode
        w_in[e].copy_(gate_up[e].index_select(0, expert_in_rows(rc[0], d_ff)))
        gather_columns(down[e], rc[0], wd_rc[e, :, : rc.shape[-1]])
