"""The ``pop::`` custom ops for routed experts (3-D expert weights), each with its fake beside it.

One op replaces an experts module's whole computation (see ``passes/match_experts.py``):
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` with
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. Each expert is its own POP site
(POP_SPEC, Experts): its partition comes from the prefill tokens routed to it.

State of one experts module (``pop_fx.expert_state``), G = 1 partition group under
scope="batch", max_batch_size under scope="sequence":

* ``wd_norm``  [E, I] fp32 — ||Wd_e[:, j]||, weight-only, computed once;
* ``rc_idx``   [E, G, n_R + n_C] int64 — R then C of each expert, ascending channel order;
* ``wd_norm_c`` [E, G, n_C] fp32 — ||Wd_e[:, j]|| of the candidates;
* ``dense``    [E, G] bool — the expert got no prefill token and ``empty_expert="dense"``;
* ``w_in``     [E, 2·(n_R+n_C), H] — gate rows then up rows of R ∪ C, contiguous ("batch" only);
* ``wd_t``     [E, n_R+n_C, H] — down columns of R ∪ C, channel-major ("batch" only).

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

_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _act(name: str):
    try:
        return _ACT[name]
    except KeyError:
        raise ValueError(f"activation={name!r} is not supported for experts: allowed {list(_ACT)}") from None


def _rc_rows(rc: Tensor, d_ff: int) -> Tensor:
    """Rows of gate_up [2I, H] that hold channels ``rc``: gate rows, then up rows."""
    return torch.cat([rc, rc + d_ff], dim=-1)


def expert_scores(h: Tensor, rows: Tensor, wd_norm_e: Tensor, gate_up_e: Tensor, empty_dense: bool) -> Tensor | None:
    """Eq. 3 importance of one expert over ``rows`` of its tokens; POP_SPEC's fallback when none is valid.

    Returns None for "leave this expert dense" (``empty_expert="dense"`` and no token).
    """
    if bool(rows.any()):
        # where() rather than a multiply: a fully masked padding row may hold NaN, and NaN * 0 is NaN.
        return P.importance(torch.where(rows[:, None], h.detach().float(), 0.0), wd_norm_e)
    if empty_dense:
        return None
    return P.weight_only_scores(wd_norm_e, list(gate_up_e.chunk(2, dim=0)))


def write_expert_partition(e: int, scores: Tensor, dense_g: Tensor, sizes: P.PartitionSizes, gate_up: Tensor,
                           down: Tensor, wd_norm: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, dense: Tensor,
                           w_in: Tensor, wd_t: Tensor) -> None:
    """Split ``scores`` [G', I] of expert ``e`` into R/C/P for groups 0..G'-1 and write the state in place."""
    d_ff = scores.shape[-1]
    G = scores.shape[0]
    part = P.split(scores, sizes)
    rc = torch.cat([part.R, part.C], dim=-1)  # [G, n_RC]
    rc_idx[e, :G].copy_(rc)
    wd_norm_c[e, :G].copy_(wd_norm[e][part.C])
    dense[e, :G].copy_(dense_g)
    if w_in.numel():  # scope="batch": one group, laid out contiguously for decode
        w_in[e].copy_(gate_up[e].index_select(0, _rc_rows(rc[0], d_ff)))
        wd_t[e].copy_(down[e].index_select(1, rc[0]).t())


def _groups(hidden: Tensor, batch: int, attention_mask: Tensor | None, per_sequence: bool):
    """(group id [T], valid [T]) of each token row; rows are B-major ([B·L, H])."""
    T = hidden.shape[0]
    L = T // batch if batch else T
    seq = torch.arange(batch, device=hidden.device).repeat_interleave(L)
    valid = torch.ones(T, dtype=torch.bool, device=hidden.device)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch and batch * L == T:
        valid = attention_mask[:, -L:].reshape(-1).bool().to(hidden.device)
    return (seq if per_sequence else torch.zeros_like(seq)), valid


# --------------------------------------------------------------------------------------------
# prefill: per-expert importance from its routed tokens, partitions into state, expert output
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pop::experts_prefill", mutates_args=("rc_idx", "wd_norm_c", "dense", "w_in", "wd_t"))
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
    wd_t: Tensor,
    n_keep: int,
    n_R: int,
    n_C: int,
    activation: str,
    per_sequence: bool,
    pruned_prefill: bool,
    empty_dense: bool,
) -> Tensor:
    """hidden [B·L, H] of the prefill tokens -> the experts' output [B·L, H] (pruned per config.prefill)."""
    act = _act(activation)
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
            s = expert_scores(h, v_rows & (g_rows == g), wd_norm[e], gate_up[e], empty_dense)
            if s is None:
                dense_g[g] = True
                s = torch.zeros_like(wd_norm[e])  # placeholder partition, never used
            scores.append(s)
        scores = torch.stack(scores)
        write_expert_partition(e, scores, dense_g, sizes, gate_up, down, wd_norm, rc_idx, wd_norm_c, dense, w_in, wd_t)
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
      w_in, wd_t, n_keep, n_R, n_C, activation, per_sequence, pruned_prefill, empty_dense):
    return torch.empty_like(hidden)


# --------------------------------------------------------------------------------------------
# decode: each token only through its chosen experts, each over R ∪ selected candidates
# --------------------------------------------------------------------------------------------


def _decode_expert(x: Tensor, e: int, g: int, gate_up: Tensor, down: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                   dense: Tensor, w_in: Tensor, wd_t: Tensor, n_R: int, n_select: int, act) -> Tensor:
    """Expert ``e``'s output for rows ``x`` [n, H] of partition group ``g`` (before routing weights)."""
    if bool(dense[e, g]):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        return F.linear(act(gate) * up, down[e])
    d_ff = down.shape[-1]
    if w_in.numel():
        z, wdt = F.linear(x, w_in[e]), wd_t[e]
    else:  # scope="sequence": this group's R ∪ C gathered from the original weights
        rc = rc_idx[e, g]
        z, wdt = F.linear(x, gate_up[e].index_select(0, _rc_rows(rc, d_ff))), down[e].index_select(1, rc).t()
    gate, up = z.chunk(2, dim=-1)
    h_rc = act(gate) * up  # [n, n_R + n_C]
    y = h_rc[:, :n_R] @ wdt[:n_R]
    if n_select > 0:
        h_c = h_rc[:, n_R:]
        sel = P.select(h_c, wd_norm_c[e, g], n_select)  # positions within C, scored over the group's rows
        y = torch.addmm(y, h_c.index_select(1, sel), wdt[n_R:].index_select(0, sel))
    return y


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
    wd_t: Tensor,
    n_R: int,
    n_select: int,
    activation: str,
    per_sequence: bool,
) -> Tensor:
    """hidden [B, H] (one token per sequence) -> [B, H]; only the experts a token chose run for it."""
    act = _act(activation)
    E = down.shape[0]
    final = torch.zeros_like(hidden)
    for e in range(E):
        top_k_pos, token_idx = torch.where(top_k_index.t() == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        if per_sequence:  # row b is sequence b (one token each): its own partition
            out = torch.cat([_decode_expert(x[i:i + 1], e, int(token_idx[i]), gate_up, down, rc_idx, wd_norm_c, dense,
                                            w_in, wd_t, n_R, n_select, act) for i in range(x.shape[0])])
        else:
            out = _decode_expert(x, e, 0, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_t, n_R, n_select, act)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@experts_decode.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_t, n_R, n_select,
      activation, per_sequence):
    return torch.empty_like(hidden)


__all__ = ["experts_decode", "experts_prefill", "expert_scores", "write_expert_partition"]
