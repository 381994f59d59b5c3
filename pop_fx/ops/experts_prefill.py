"""The ``pop::`` custom ops for routed experts (3-D expert weights), each with its fake beside it.

One op replaces an experts module's whole computation (see ``passes/match_experts.py``):
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` with
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. Each expert is its own POP site
(docs/spec.md, Experts): its partition comes from the prefill tokens routed to it.

State of one experts module (``pop_fx.state.ExpertsState``), G = 1 partition group under
scope="batch", max_batch_size under scope="sequence":

* ``wd_norm``  [E, I] fp32 — ||Wd_e[:, j]||, weight-only, computed once;
* ``rc_idx``   [E, G, n_R + n_C] int64 — R then C of each expert, ascending channel order;
* ``wd_norm_c`` [E, G, n_C] fp32 — ||Wd_e[:, j]|| of the candidates;
* ``dense``    [E, G] bool — the expert got no prefill token and ``empty_expert="dense"``;
* ``w_in``     [E, 2·(n_R+n_C), H] — gate rows then up rows of R ∪ C, contiguous ("batch" only);
* ``wd_rc``     [E, H, n_R+n_C] — down columns of R ∪ C, each expert in ``nn.Linear``'s layout ("batch" only).

Prefill with fixed shapes and no host sync, like decode (``experts_decode.py``): the T·k (token, expert)
pairs sorted by expert, one grouped GEMM for gate/up over the experts' whole weights, per-(expert, group)
importance by an ``index_add`` of the squared activations of valid (non-padding) rows, every expert's R/C/P
split in one batched sort, the layouts written by one row and one column gather over all experts
(``layout.gather_rows`` / ``gather_columns``), and one grouped GEMM for
the down projection. An expert that got no valid prefill token keeps the weight-norm partition
(``weight_scores``, computed once per weights), or is marked dense. ``experts_prefill_loop`` is the loop
over experts it replaced, with the eager reference's math (``pop_fx.reference``), kept for the tests: the
two agree to rounding. Ranks, splits and selections come
from ``pop_fx.partition`` like every other path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary  # tensors compare elementwise: key them by identity

from pop_fx import partition as P
from pop_fx.activations import activation as activation_fn
from pop_fx.ops.experts_decode import combine, grouped_gemv, route_pairs
from pop_fx.ops.layout import gather_columns, gather_rows, write_expert_partition


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


_WEIGHT_SCORES: "WeakIdKeyDictionary[Tensor, tuple[int, Tensor]]" = WeakIdKeyDictionary()


def weight_scores(gate_up: Tensor, wd_norm: Tensor) -> Tensor:
    """[E, I] data-free scores ||Wd_e[:, j]||·||Wg_e[j]||·||Wu_e[j]|| (docs/spec.md's empty-expert fallback), computed
    once per weights (a pass over every expert) and kept while ``gate_up`` is unchanged."""
    hit = _WEIGHT_SCORES.get(gate_up)
    if hit is not None and hit[0] == gate_up._version and hit[1].shape == wd_norm.shape:
        return hit[1]
    n = torch.linalg.vector_norm(gate_up.detach().float(), dim=-1)  # [E, 2I]
    d_ff = wd_norm.shape[-1]
    s = wd_norm.float() * n[:, :d_ff] * n[:, d_ff:]
    _WEIGHT_SCORES[gate_up] = (gate_up._version, s)
    return s


def experts_prefill_pairs(hidden, top_k_index, top_k_weights, gate_up, down, attention_mask, batch, wd_norm, rc_idx,
                          wd_norm_c, dense, w_in, wd_rc, n_keep, n_R, n_C, activation, per_sequence, pruned_prefill,
                          empty_dense) -> Tensor:
    """The op's body: the T·k (token, expert) pairs with fixed shapes, no host sync (see the module docstring)."""
    act = activation_fn(activation)
    E, H, d_ff = down.shape
    sizes = P.PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)
    gid, valid = _groups(hidden, batch, attention_mask, per_sequence)
    G = batch if per_sequence else 1
    if G > rc_idx.shape[1]:
        raise ValueError(f"batch size {G} exceeds PopConfig.max_batch_size={rc_idx.shape[1]} (scope='sequence'): "
                         "compile with a larger max_batch_size")
    order, expert, token, offs = route_pairs(top_k_index, E)
    gate, up = grouped_gemv(hidden.index_select(0, token), gate_up, expert, offs).chunk(2, dim=-1)
    h = act(gate) * up  # [P, I]
    slot = expert * G + gid.index_select(0, token)  # the pair's (expert, partition group)
    ok = valid.index_select(0, token)[:, None] & ~torch.isnan(h)  # padding and NaN count as 0 (activation_norm)
    sq = torch.zeros(E * G, d_ff, dtype=torch.float32, device=h.device)
    sq.index_add_(0, slot, torch.where(ok, h.detach().float(), 0.0).square())
    rows = torch.zeros(E * G, dtype=torch.int32, device=h.device)
    rows.scatter_add_(0, slot, valid.index_select(0, token).to(torch.int32))
    has = (rows > 0)[:, None]
    wd_g = wd_norm.float().repeat_interleave(G, dim=0)  # [E·G, I]
    scores = torch.where(has, sq.sqrt() * wd_g, weight_scores(gate_up, wd_norm).repeat_interleave(G, dim=0))
    dense_g = ~has[:, 0] if empty_dense else torch.zeros_like(has[:, 0])
    scores = torch.where(dense_g[:, None], 0.0, scores)  # placeholder partition of a dense expert, never used
    part = P.split(scores.view(E, G, d_ff), sizes)
    rc = torch.cat([part.R, part.C], dim=-1)  # [E, G, n_rc]
    rc_idx[:, :G].copy_(rc)
    wd_norm_c[:, :G].copy_(torch.gather(wd_g.view(E, G, d_ff), 2, part.C))
    dense[:, :G].copy_(dense_g.view(E, G))
    if w_in.numel():  # scope="batch": one group, each expert's R ∪ C laid out contiguously for decode
        n_rc = rc.shape[-1]
        rows_in = torch.cat([rc[:, 0], rc[:, 0] + d_ff], dim=-1)  # [E, 2·n_rc]
        gather_rows(gate_up, rows_in, w_in)
        gather_columns(down, rc[:, 0], wd_rc[:, :, :n_rc])
    if pruned_prefill:
        keep = torch.zeros(E * G, d_ff, dtype=torch.bool, device=h.device)
        keep.scatter_(1, P.keep_set(scores, sizes), True)
        keep |= dense_g[:, None]
        h = h * keep.index_select(0, slot).to(h.dtype)
    y = grouped_gemv(h.contiguous(), down, expert, offs)
    return combine(y, order, top_k_weights).to(hidden.dtype)


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
    return experts_prefill_pairs(hidden, top_k_index, top_k_weights, gate_up, down, attention_mask, batch, wd_norm,
                                 rc_idx, wd_norm_c, dense, w_in, wd_rc, n_keep, n_R, n_C, activation, per_sequence,
                                 pruned_prefill, empty_dense)


@experts_prefill.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down, attention_mask, batch, wd_norm, rc_idx, wd_norm_c, dense,
      w_in, wd_rc, n_keep, n_R, n_C, activation, per_sequence, pruned_prefill, empty_dense):
    return torch.empty_like(hidden)




def experts_prefill_loop(
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
    """The loop over experts ``experts_prefill`` replaced (``where``/``numel``/``bool`` on the routing): the tests'
    reference, with the eager reference's math."""
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


__all__ = ["experts_prefill", "experts_prefill_loop", "experts_prefill_pairs", "weight_scores"]
