"""``pop::values_decode``: a whole decode FFN under ``candidate_proxy="int8-values"`` (x → y, one op per site).

Beyond the paper: a low-precision full re-evaluation with an exact down projection. Each decode step

    H̃     = act(x · G̃ᵀ) · (x · Ũᵀ)                    every channel, from the per-row int8 copy (pop_fx.lowbit)
    S_t   = R ∪ top_{n_select}( |H̃_C| · ||Wd[:, C]|| )  POP's candidate scoring (partition.candidate_topk)
    y     = Σ_{j ∈ S_t} H̃_j · Wd[:, j]  (+ bd)          exact down weights, the chosen n_keep channels only

The int8 products run in ``aten._weight_int8pack_mm`` (x and the scales in bf16, bf16 out; ``lowbit.int8_rows_mm``).
No exact gate/up row is read: H of the chosen channels IS the int8-derived H̃. The down projection at batch 1 is
``F.embedding_bag`` over the channel-major copy ``wd_t`` [d_ff, d_out] (made once per model): it reads the n_keep
chosen rows only, with no gathered copy. At batch > 1 a per-row bag would read every row B times, so the op runs a
masked dense GEMV over the site's own ``wd`` instead (unchosen channels zeroed).

Static shapes, no host sync (``tests/pop_fx/ops/test_no_host_sync.py``). An opaque ``custom_op``: Inductor calls
its body as is. On CUDA the same torch code runs (no kernel of its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx.lowbit import values_activations
from pop_fx.partition import candidate_topk


def values_decode_reference(x: Tensor, q: Tensor, s: Tensor, wd_t: Tensor, wd: Tensor, bd: Tensor | None,
                            rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int,
                            act: int) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    h = values_activations(x2, q, s, d_ff, act)  # [B, d_ff] fp32
    rc = rc_idx[0]
    c_idx = rc[n_R:]
    pos = candidate_topk(h.index_select(1, c_idx), wd_norm_c, n_select)
    idx = torch.cat([rc[:n_R], c_idx.index_select(0, pos)])  # [n_keep]: R, then the chosen candidates
    h_sel = h.index_select(1, idx).to(wd_t.dtype)
    if x2.shape[0] == 1:
        y = F.embedding_bag(idx[None], wd_t, per_sample_weights=h_sel, mode="sum")
        if bd is not None:
            y = y + bd
    else:
        hm = torch.zeros(x2.shape[0], d_ff, dtype=wd.dtype, device=x.device).index_copy(1, idx, h_sel.to(wd.dtype))
        y = F.linear(hm, wd, bd)
    return y.to(x.dtype).reshape(*x.shape[:-1], wd_t.shape[1])


@torch.library.custom_op("pop::values_decode", mutates_args=())
def values_decode(x: Tensor, q: Tensor, s: Tensor, wd_t: Tensor, wd: Tensor, bd: Tensor | None, rc_idx: Tensor,
                  wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int, act: int) -> Tensor:
    """The FFN output [..., d_out] for decode tokens x [..., d_model] (see the module docstring)."""
    return values_decode_reference(x, q, s, wd_t, wd, bd, rc_idx, wd_norm_c, n_R, n_select, d_ff, act)


@values_decode.register_fake
def _(x, q, s, wd_t, wd, bd, rc_idx, wd_norm_c, n_R, n_select, d_ff, act):
    return x.new_empty(*x.shape[:-1], wd_t.shape[1])


__all__ = ["values_decode", "values_decode_reference"]
