"""``pop::experts_decode``: each decode token through its chosen experts, each over R ∪ selected candidates.

State and math as in ``experts_prefill.py`` (which documents the experts' state tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import partition as P
from pop_fx.activations import activation as activation_fn
from pop_fx.ops.layout import expert_in_rows


# --------------------------------------------------------------------------------------------
# decode: each token only through its chosen experts, each over R ∪ selected candidates
# --------------------------------------------------------------------------------------------


def _decode_expert(x: Tensor, e: int, g: int, gate_up: Tensor, down: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                   dense: Tensor, w_in: Tensor, wd_rc: Tensor, n_R: int, n_select: int, act) -> Tensor:
    """Expert ``e``'s output for rows ``x`` [n, H] of partition group ``g`` (before routing weights)."""
    if bool(dense[e, g]):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        return F.linear(act(gate) * up, down[e])
    d_ff = down.shape[-1]
    if w_in.numel():
        z, wdl = F.linear(x, w_in[e]), wd_rc[e, :, : w_in.shape[1] // 2]  # rows padded (layout.ROW_ALIGN)
    else:  # scope="sequence": this group's R ∪ C gathered from the original weights
        rc = rc_idx[e, g]
        z, wdl = F.linear(x, gate_up[e].index_select(0, expert_in_rows(rc, d_ff))), down[e].index_select(1, rc)
    gate, up = z.chunk(2, dim=-1)
    h_rc = act(gate) * up  # [n, n_R + n_C]
    if n_select == 0:
        return F.linear(h_rc[:, :n_R], wdl[:, :n_R])
    h_c = h_rc[:, n_R:]
    sel = P.select(h_c, wd_norm_c[e, g], n_select)  # positions within C, scored over the group's rows
    keep_c = torch.zeros(h_c.shape[-1], dtype=h_c.dtype, device=h_c.device).index_fill_(0, sel, 1)
    return F.linear(torch.cat([h_rc[:, :n_R], h_c * keep_c], dim=-1), wdl)


@torch.library.custom_op("pop::experts_decode", mutates_args=())
def experts_decode(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    rc_idx: Tensor,
    wd_norm_c: Tensor,
    dense: Tensor,
    w_in: Tensor,
    wd_rc: Tensor,
    n_R: int,
    n_select: int,
    activation: str,
    per_sequence: bool,
) -> Tensor:
    """hidden [B, H] (one token per sequence) -> [B, H]; only the experts a token chose run for it."""
    act = activation_fn(activation)
    E = down.shape[0]
    final = torch.zeros_like(hidden)
    for e in range(E):
        top_k_pos, token_idx = torch.where(top_k_index.t() == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        if per_sequence:  # row b is sequence b (one token each): its own partition
            out = torch.cat([_decode_expert(x[i:i + 1], e, int(token_idx[i]), gate_up, down, rc_idx, wd_norm_c, dense,
                                            w_in, wd_rc, n_R, n_select, act) for i in range(x.shape[0])])
        else:
            out = _decode_expert(x, e, 0, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_rc, n_R, n_select, act)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@experts_decode.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_rc, n_R, n_select,
      activation, per_sequence):
    return torch.empty_like(hidden)



__all__ = ["experts_decode"]
