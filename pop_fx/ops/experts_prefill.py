"""The ``pop::`` custom ops for routed experts (3-D expert weights), each with its fake beside it.

One op replaces an experts module's whole computation (see ``passes/match_experts.py``):
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` with
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. Each expert is its own POP site
(POP_SPEC, Experts): its partition comes from the prefill tokens routed to it.

State of one experts module (``pop_fx.state.ExpertsState``), G = 1 partition group under
scope="batch", max_batch_size under scope="sequence":

* ``wd_norm``  [E, I] fp32 — ||Wd_e[:, j]||, weight-only, computed once;
* ``rc_idx``   [E, G, n_R + n_C] int64 — R then C of each expert, ascending channel order;
* ``wd_norm_c`` [E, G, n_C] fp32 — ||Wd_e[:, j]|| of the candidates;
* ``dense``    [E, G] bool — the expert got no prefill token and ``empty_expert="dense"``;
* ``w_in``     [E, 2·(n_R+n_C), H] — gate rows then up rows of R ∪ C, contiguous ("batch" only);
* ``wd_rc``     [E, H, n_R+n_C] — down columns of R ∪ C, each expert in ``nn.Linear``'s layout ("batch" only).

The math follows the eager reference (``pop_fx.reference``: a loop over experts in index
order, tokens of expert e from ``where(top_k_index.T == e)``, ``index_add_`` into zeros), so
the compiled path and the reference agree to rounding. Ranks, splits and selections come
from ``pop_fx.partition`` like every other path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import partition as P
from pop_fx.activations import activation as activation_fn
from pop_fx.ops.layout import write_expert_partition


def _groups(hidden: Tensor, batch: int, attention_mask: Tensor | None, per_sequence: bool):
    """(group id [T], valid [T]) of each token row; rows are B-major ([B·L, H])."""
    T = hidden.shape[0]
    L = T // batch if batch else T
    seq = torch.arange(batch, device=hidden.device).repeat_interleave(L)
    valid = torch.ones(T, dtype=torch.bool, device=hidden.device)
    tm = P.token_mask(attention_mask, batch, L) if batch * L == T else None
    if tm is not None:
        valid = tm.reshape(-1).to(hidden.device)
    return (seq if per_sequence else torch.zeros_like(seq)), valid


# --------------------------------------------------------------------------------------------
# prefill: per-expert importance from its routed tokens, partitions into state, expert output
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pop::experts_prefill", mutates_args=("rc_idx", "wd_norm_c", "dense", "w_in", "wd_rc"))
def experts_prefill(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    attention_mask: Tensor | None,
    batch: int,
    wd_norm: Tensor,
    rc_idx: Tensor,
    wd_norm_c: Tensor,
    dense: Tensor,
    w_in: Tensor,
    wd_rc: Tensor,
    n_keep: int,
    n_R: int,
    n_C: int,
    activation: str,
    per_sequence: bool,
    pruned_prefill: bool,
    empty_dense: bool,
) -> Tensor:
    """hidden [B·L, H] of the prefill tokens -> the experts' output [B·L, H] (pruned per config.prefill)."""
    act = activation_fn(activation)
    E, _, d_ff = down.shape
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    gid, valid = _groups(hidden, batch, attention_mask, per_sequence)
    G = batch if per_sequence else 1
    if G > rc_idx.shape[1]:
        raise ValueError(f"batch size {G} exceeds PopConfig.max_batch_size={rc_idx.shape[1]} (scope='sequence'): "
                         "compile with a larger max_batch_size")
    final = torch.zeros_like(hidden)
    for e in range(E):
        top_k_pos, token_idx = torch.where(top_k_index.t() == e)
        gate, up = F.linear(hidden[token_idx], gate_up[e]).chunk(2, dim=-1)
        h = act(gate) * up
        g_rows, v_rows = gid[token_idx], valid[token_idx]
        scores, dense_g = [], torch.zeros(G, dtype=torch.bool, device=hidden.device)
        for g in range(G):
            s = P.expert_scores(h, v_rows & (g_rows == g), wd_norm[e], gate_up[e], empty_dense)
            if s is None:
                dense_g[g] = True
                s = torch.zeros_like(wd_norm[e])  # placeholder partition, never used
            scores.append(s)
        scores = torch.stack(scores)
        write_expert_partition(e, scores, dense_g, sizes, gate_up, down, wd_norm, rc_idx, wd_norm_c, dense, w_in, wd_rc)
        if token_idx.numel() == 0:
            continue
        if pruned_prefill:
            keep = torch.zeros(scores.shape, dtype=torch.bool, device=h.device)
            keep.scatter_(1, P.keep_set(scores, sizes), True)
            keep[dense_g] = True
            h = h * keep[g_rows].to(h.dtype)
        out = F.linear(h, down[e]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@experts_prefill.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down, attention_mask, batch, wd_norm, rc_idx, wd_norm_c, dense,
      w_in, wd_rc, n_keep, n_R, n_C, activation, per_sequence, pruned_prefill, empty_dense):
    return torch.empty_like(hidden)


__all__ = ["experts_prefill"]
