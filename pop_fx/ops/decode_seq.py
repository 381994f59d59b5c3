"""Decode step under scope="sequence": every sequence its own R ∪ C and its own selection, ``pop::decode_seq``.

    keep_b = R_b ∪ top_{n_select}(C_b by |h[b, C_b]| · ||Wd[:, C_b]||)
    y[b]   = Wd · (h[b] ⊙ 1_{keep_b})  (+ bias)

Per-sequence compact copies of the weights would multiply FFN memory by the batch (a 1B model at
batch 8 does not fit in 24 GB), so under this scope the gate/up projections stay dense over all
channels (one GEMM for the whole batch reads each weight once) and only the selection and the down
projection are per sequence: the unselected channels of each row are zeroed and ONE dense down GEMM
serves the batch. That is the fastest correct path on both devices at batch > 1: per-sequence gathers
would read B partial copies of Wd instead of one whole one, and on a GPU a row-major [d_out, d_ff] weight
read at half its columns, scattered, touches nearly every sector anyway. What this scope saves over dense
is arithmetic, not bytes (docs/benchmarks.md says what it costs).

Implementations (``pop_fx.autotune`` choices; under ``kernels="auto"`` Inductor measures those that serve):

* ``masked`` — ``decode_seq_reference``, plain torch: each row's unselected channels zeroed, one dense down GEMM
  for the batch (today's dispatch for the torch family);
* ``gather`` — each row's kept channels gathered from Wd (a [B, n_keep, d_out] copy) and one batched GEMV
  (reads n_keep columns a row instead of d_ff, B times);
* ``gather_sum`` — the same products as one reduction Inductor fuses the gather into (no copy; fp32 accumulation);
* ``triton_splitk`` (CUDA, ``kernels="triton"``'s default) — the masked product through ``splitk_gemv``'s
  split-K GEMV (each weight read once for up to ``BLOCK_B`` rows, coalesced along d_ff; bias and cast in its
  finishing launch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx import autotune
from pop_fx.ops.layout import CONV1D  # Conv1D stores Wd as [d_ff, d_out]
from pop_fx.ops.decode import triton_serves
from pop_fx.ops.splitk_gemv import gemv_triton
from pop_fx.partition import candidate_topk


def keep_indices(h2: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int) -> Tensor:
    """[B, n_R + n_select] channel indices each sequence computes this step."""
    B = h2.shape[0]
    idx = rc_idx[:B]
    c_idx = idx[:, n_R:]
    if n_select == 0:
        return idx[:, :n_R]
    h_c = torch.gather(h2, 1, c_idx)
    sel = candidate_topk(h_c, wd_norm[c_idx], n_select, per_sequence=True)  # [B, n_select] positions in C_b
    return torch.cat([idx[:, :n_R], torch.gather(c_idx, 1, sel)], dim=1)


def _down(h2: Tensor, wd: Tensor, bd: Tensor | None, flags: int) -> Tensor:
    if flags & CONV1D:
        return torch.addmm(bd, h2, wd) if bd is not None else h2 @ wd
    return torch.nn.functional.linear(h2, wd, bd)


def _masked(h: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int) -> Tensor:
    B = h.shape[0]
    h2 = h.reshape(B, h.shape[-1])  # one token per sequence
    keep = keep_indices(h2, wd_norm, rc_idx, n_R, n_select)
    return h2 * torch.zeros_like(h2).scatter_(1, keep, 1.0)


def decode_seq_reference(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
                         n_select: int, flags: int) -> Tensor:
    y = _down(_masked(h, wd_norm, rc_idx, n_R, n_select), wd, bd, flags)
    return y.reshape(*h.shape[:-1], y.shape[-1])


def _kept_weights(h: Tensor, wd: Tensor, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int, flags: int):
    """(h's kept values [B, n_keep], Wd's kept columns as rows [B, n_keep, d_out], a view's source) per sequence."""
    h2 = h.reshape(h.shape[0], h.shape[-1])
    keep = keep_indices(h2, wd_norm, rc_idx, n_R, n_select)  # [B, n_keep]
    rows = wd if flags & CONV1D else wd.t()  # [d_ff, d_out]
    return h2.gather(1, keep), rows[keep]


def decode_seq_gather(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
                      n_select: int, flags: int) -> Tensor:
    """Each sequence's kept columns of Wd gathered, then one batched GEMV."""
    h_k, w_k = _kept_weights(h, wd, wd_norm, rc_idx, n_R, n_select, flags)
    y = torch.bmm(h_k.unsqueeze(1), w_k).squeeze(1)
    if bd is not None:
        y = y + bd
    return y.reshape(*h.shape[:-1], y.shape[-1])


def decode_seq_gather_sum(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int,
                          n_select: int, flags: int) -> Tensor:
    """Σ_j h[b, j] · Wd[:, j] over each sequence's kept channels as one reduction (the gather fuses into it)."""
    h_k, w_k = _kept_weights(h, wd, wd_norm, rc_idx, n_R, n_select, flags)
    y = (w_k.float() * h_k.float().unsqueeze(-1)).sum(1)
    if bd is not None:
        y = y + bd.float()
    return y.to(h.dtype).reshape(*h.shape[:-1], y.shape[-1])


def _serves_triton(a) -> bool:
    return not a["flags"] & CONV1D and triton_serves(a["h"].reshape(a["h"].shape[0], -1))


def _masked_choice(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags):
    return decode_seq_reference(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags)


def _triton(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags):
    y = gemv_triton(_masked(h, wd_norm, rc_idx, n_R, n_select), wd, launch=torch.library.wrap_triton, bias=bd)
    return y.reshape(*h.shape[:-1], y.shape[-1])


def _default(code: int, a, lowering: bool) -> str:
    return "triton_splitk" if code == autotune.TRITON and _serves_triton(a) else "masked"


def _index_inputs(a):
    # rc_idx indexes h's channels: any valid indices will do for timing (zeros would gather one channel)
    return {"rc_idx": lambda shape, dtype, device: torch.arange(shape[-1], device=device).expand(*shape)}


CHOICES = autotune.register("pop::decode_seq", [
    autotune.Choice("masked", _masked_choice),
    autotune.Choice("gather", decode_seq_gather),
    autotune.Choice("gather_sum", decode_seq_gather_sum),
    autotune.Choice("triton_splitk", _triton, "triton", _serves_triton, any_size=False),
], _default, _index_inputs)


@torch.library.custom_op("pop::decode_seq", mutates_args=())
def decode_seq(h: Tensor, wd: Tensor, bd: Tensor | None, wd_norm: Tensor, rc_idx: Tensor, n_R: int, n_select: int,
               flags: int, kernels: int = 0) -> Tensor:
    return autotune.run("pop::decode_seq", dict(h=h, wd=wd, bd=bd, wd_norm=wd_norm, rc_idx=rc_idx, n_R=n_R,
                                                n_select=n_select, flags=flags, kernels=kernels))


@decode_seq.register_fake
def _(h, wd, bd, wd_norm, rc_idx, n_R, n_select, flags, kernels=0):
    autotune.install()  # tracing reaches the fake before Inductor lowers the op: its lowering is in place
    return h.new_empty(*h.shape[:-1], wd.shape[1] if flags & CONV1D else wd.shape[0])


__all__ = ["CHOICES", "decode_seq", "decode_seq_gather", "decode_seq_gather_sum", "decode_seq_reference",
           "keep_indices"]
