"""The ``pop::`` custom ops that the graph rewrite inserts, each with its fake beside it.

A site's state (see ``pop_fx.state``) enters the graphs as explicit tensors:

* ``rc_idx`` [S, n_R + n_C] int64 — R then C, each in ascending channel order
  (S = 1 under scope="batch", max_batch_size under scope="sequence");
* ``wd_norm_c`` [S, n_C] fp32 — ||Wd[:, j]|| of the candidates, for per-step scoring;
* ``w_in`` / ``b_in`` — the gate/up (or up) rows of R ∪ C laid out contiguously,
  [n_in·(n_R+n_C), d_model] and its bias ("batch" scope; empty under "sequence");
* ``wd_t`` [n_R+n_C, d_out] — the down projection's columns of R ∪ C, channel-major,
  so a decode step's down projection reads contiguous rows ("batch" scope).

The prefill op writes all of them in place; decode ops only read them. The
user's Parameters are never modified. Every op calls ``pop_fx.partition`` for
ranks and selection, like the eager reference does.

Layout flags (``flags`` argument, a bit set):
  FUSED  — ``w_a`` holds gate rows [0, d_ff) and up rows [d_ff, 2·d_ff) (Phi-3's gate_up_proj);
  CONV1D — weights are stored [in, out] (GPT-2's Conv1D) instead of [out, in].
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import partition as P

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


def _down(h: Tensor, wd: Tensor, bd: Tensor | None, flags: int) -> Tensor:
    """The site's own down projection, computed as the model computes it (linear, or addmm for Conv1D)."""
    if flags & CONV1D:
        out = torch.addmm(bd, h.reshape(-1, h.shape[-1]), wd) if bd is not None else h.reshape(-1, h.shape[-1]) @ wd
        return out.reshape(*h.shape[:-1], wd.shape[1])
    return torch.nn.functional.linear(h, wd, bd)


def _d_out(wd: Tensor, flags: int) -> int:
    return wd.shape[1] if flags & CONV1D else wd.shape[0]


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


# --------------------------------------------------------------------------------------------
# prefill: importance, partition into state, layouts, FFN output per config.prefill
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "pop::prefill",
    mutates_args=("rc_idx", "wd_norm_c", "w_in", "b_in", "wd_t"),
)
def prefill(
    h: Tensor,
    attention_mask: Tensor | None,
    wd: Tensor,
    bd: Tensor | None,
    w_a: Tensor,
    b_a: Tensor | None,
    w_b: Tensor | None,
    b_b: Tensor | None,
    wd_norm: Tensor,
    rc_idx: Tensor,
    wd_norm_c: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    wd_t: Tensor,
    n_keep: int,
    n_R: int,
    n_C: int,
    flags: int,
    per_sequence: bool,
    pruned_prefill: bool,
) -> Tensor:
    """h: [B, L, d_ff] intermediate activation of the prefill tokens; returns the FFN output [B, L, d_out]."""
    d_ff = h.shape[-1]
    B, L = h.shape[0], h.shape[-2]
    token_mask = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == B and h.dim() == 3:
        token_mask = attention_mask[:, -L:]
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    scores = P.importance(h, wd_norm, token_mask, per_sequence=per_sequence)  # [d_ff] or [B, d_ff]
    if per_sequence and B > rc_idx.shape[0]:
        raise ValueError(
            f"batch size {B} exceeds PopConfig.max_batch_size={rc_idx.shape[0]} (scope='sequence'): "
            "compile with a larger max_batch_size"
        )
    write_partition(scores, sizes, wd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_t, flags)
    if not pruned_prefill:
        return _down(h, wd, bd, flags)
    keep = P.keep_set(scores, sizes)
    mask = torch.zeros(scores.shape, dtype=h.dtype, device=h.device).scatter_(-1, keep, 1)
    if per_sequence:
        mask = mask.reshape(B, *([1] * (h.dim() - 2)), d_ff)
    return _down(h * mask, wd, bd, flags)


@prefill.register_fake
def _(h, attention_mask, wd, bd, w_a, b_a, w_b, b_b, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_t,
      n_keep, n_R, n_C, flags, per_sequence, pruned_prefill):
    return h.new_empty(*h.shape[:-1], _d_out(wd, flags))


# --------------------------------------------------------------------------------------------
# decode, scope="batch": candidates scored on the step's token, down over R ∪ selected
# --------------------------------------------------------------------------------------------


def decode_reference(h_rc: Tensor, wd_t: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int) -> Tensor:
    """y = Wd[:, R ∪ S_t] · H_t[R ∪ S_t] with S_t = top_{n_select}(C by |H_t| · ||Wd[:, j]||).

    h_rc: [B, 1, n_R + n_C] (R first, then C), wd_t: [n_R + n_C, d_out] channel-major.
    """
    h_R = h_rc[..., :n_R]
    y = h_R @ wd_t[:n_R]
    if n_select > 0:
        h_C = h_rc[..., n_R:]
        sel = P.select(h_C, wd_norm_c.reshape(-1), n_select)  # positions within C, [n_select]
        y = torch.addmm(y.reshape(-1, y.shape[-1]), h_C.reshape(-1, h_C.shape[-1]).index_select(1, sel),
                        wd_t[n_R:].index_select(0, sel)).reshape(y.shape)
    if bd is not None:
        y = y + bd
    return y


@torch.library.custom_op("pop::decode", mutates_args=())
def decode(h_rc: Tensor, wd_t: Tensor, bd: Tensor | None, wd_norm_c: Tensor, n_R: int, n_select: int) -> Tensor:
    return decode_reference(h_rc, wd_t, bd, wd_norm_c, n_R, n_select)


@decode.register_fake
def _(h_rc, wd_t, bd, wd_norm_c, n_R, n_select):
    return h_rc.new_empty(*h_rc.shape[:-1], wd_t.shape[1])


# --------------------------------------------------------------------------------------------
# decode, scope="sequence": each sequence its own R ∪ C, gathered from the original weights
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pop::gather_in", mutates_args=())
def gather_in(x: Tensor, w_a: Tensor, b_a: Tensor | None, w_b: Tensor | None, b_b: Tensor | None,
              rc_idx: Tensor, d_ff: int, flags: int) -> Tensor:
    """Per-sequence gate/up over that sequence's R ∪ C: x [B, 1, d] (or [B, d]) -> [B, 1, n_in·n_RC]."""
    B = x.shape[0]
    outs = []
    for b in range(B):
        w, bias = _layout_in(rc_idx[b], d_ff, w_a, b_a, w_b, b_b, flags)
        outs.append(torch.nn.functional.linear(x[b], w, bias))
    return torch.stack(outs, 0)


@gather_in.register_fake
def _(x, w_a, b_a, w_b, b_b, rc_idx, d_ff, flags):
    n_in = 2 if (w_b is not None or flags & FUSED) else 1
    return x.new_empty(*x.shape[:-1], n_in * rc_idx.shape[1])


@torch.library.custom_op("pop::decode_seq", mutates_args=())
def decode_seq(h_rc: Tensor, wd: Tensor, bd: Tensor | None, wd_norm_c: Tensor, rc_idx: Tensor,
               n_R: int, n_select: int, flags: int) -> Tensor:
    """Per-sequence selection and down projection over R ∪ S_t of that sequence."""
    B = h_rc.shape[0]
    h2 = h_rc.reshape(B, -1)  # one token per sequence
    sel = P.select(h2[:, n_R:], wd_norm_c[:B], n_select, per_sequence=True) + n_R  # [B, n_select]
    keep_pos = torch.cat([torch.arange(n_R, device=h_rc.device).expand(B, n_R), sel], dim=1)
    ys = []
    for b in range(B):
        ch = rc_idx[b].index_select(0, keep_pos[b])
        cols = wd.index_select(0, ch) if flags & CONV1D else wd.index_select(1, ch).t()
        ys.append(h2[b, keep_pos[b]] @ cols)
    y = torch.stack(ys, 0).reshape(*h_rc.shape[:-1], -1)
    if bd is not None:
        y = y + bd
    return y


@decode_seq.register_fake
def _(h_rc, wd, bd, wd_norm_c, rc_idx, n_R, n_select, flags):
    return h_rc.new_empty(*h_rc.shape[:-1], _d_out(wd, flags))


__all__ = ["FUSED", "CONV1D", "prefill", "decode", "decode_reference", "gather_in", "decode_seq"]
