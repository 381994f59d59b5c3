"""The partition core: scores -> (R, C, P) and the per-step candidate selection.

Every execution path (the eager reference, the compiled ops, the kernels'
references, the evaluation harness) calls these functions, so the paths cannot
drift apart. POP_SPEC.md is the source of every rule here:

* sizes come from Python's ``round()`` on the float64 expressions as written;
* ranks come from a stable sort on (-score, channel index), so ties are broken
  by the lower channel index and all-zero scores give a deterministic result;
* R, C and P are returned in ascending channel order (contiguous reads when a
  layout is copied), and so are the selected candidates.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch


class PartitionSizes(NamedTuple):
    n_keep: int
    """channels active at every decode step"""
    n_R: int
    """retained: always computed"""
    n_C: int
    """candidates: re-scored at every decode step"""
    n_P: int
    """pruned: never computed while decoding"""

    @property
    def n_select(self) -> int:
        """candidates chosen at each decode step"""
        return self.n_keep - self.n_R

    @property
    def is_dense(self) -> bool:
        """every channel is kept (r = 0 or d_ff too small to prune): the site computes the dense FFN"""
        return self.n_keep >= self.n_R + self.n_C + self.n_P


def partition_sizes(d_ff: int, sparsity: float, candidate_ratio: float) -> PartitionSizes:
    """(n_keep, n_R, n_C, n_P) for one site, exactly as POP_SPEC.md writes them."""
    if isinstance(d_ff, bool) or not isinstance(d_ff, numbers.Integral) or d_ff < 1:
        raise ValueError(f"d_ff={d_ff!r} is invalid: allowed an integer >= 1")
    from pop_fx.config import PopConfig

    PopConfig(sparsity=sparsity, candidate_ratio=candidate_ratio)  # one place validates ranges
    d_ff = int(d_ff)
    r = float(sparsity)
    gamma = float(candidate_ratio)
    delta = gamma / 2
    n_keep = round((1 - r) * d_ff)
    n_R = max(0, n_keep - round(delta * d_ff))
    n_C = min(round(gamma * d_ff), d_ff - n_R)
    return PartitionSizes(n_keep, n_R, n_C, d_ff - n_R - n_C)


class Partition(NamedTuple):
    R: torch.Tensor
    C: torch.Tensor
    P: torch.Tensor


def down_column_norm(weight: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """||Wd[:, j]||_2 per intermediate channel j, in fp32.

    ``channel_dim`` is the axis of ``weight`` that indexes channels: -1 for
    ``nn.Linear`` ([out, d_ff]) and for 3-D expert weights ([E, out, d_ff]),
    0 for GPT-2's ``Conv1D`` ([d_ff, out]).
    """
    w = weight.detach().float()
    channel_dim = channel_dim % w.dim()
    if w.dim() == 2:
        return torch.linalg.vector_norm(w, dim=1 - channel_dim)
    if w.dim() == 3 and channel_dim == 2:
        return torch.linalg.vector_norm(w, dim=1)
    raise ValueError(f"weight of shape {tuple(weight.shape)} with channel_dim={channel_dim} is not a down projection")


def activation_norm(h: torch.Tensor, token_mask: torch.Tensor | None = None, per_sequence: bool = False) -> torch.Tensor:
    """s_j = ||H[T, j]||_2 over the tokens T (in fp32).

    ``h`` is [..., d_ff]; with ``per_sequence`` it is [B, L, d_ff] and the norm
    is taken per sequence ([B, d_ff]). ``token_mask`` ([B, L] or broadcastable
    to h's leading dims; 0 = padding) removes tokens from T.
    """
    hf = h.detach().float()
    if token_mask is not None:
        m = token_mask.to(device=hf.device, dtype=hf.dtype)
        hf = hf * m.reshape(*m.shape, *([1] * (hf.dim() - m.dim())))
    if per_sequence:
        if hf.dim() < 2:
            raise ValueError(f"per-sequence importance needs [B, L, d_ff] activations, got {tuple(h.shape)}")
        return torch.linalg.vector_norm(hf.reshape(hf.shape[0], -1, hf.shape[-1]), dim=1)
    return torch.linalg.vector_norm(hf.reshape(-1, hf.shape[-1]), dim=0)


def importance(
    h: torch.Tensor,
    wd_norm: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Eq. 3: I_j = ||H[T, j]||_2 · ||Wd[:, j]||_2 ([d_ff], or [B, d_ff] per sequence)."""
    return activation_norm(h, token_mask, per_sequence) * wd_norm.to(h.device)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices by descending score; ties by ascending index (stable sort). NaN ranks last."""
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    return torch.sort(s, dim=-1, descending=True, stable=True).indices


def split(scores: torch.Tensor, sizes: PartitionSizes) -> Partition:
    """R = the n_R best channels, C = the next n_C, P = the rest; each in ascending channel order."""
    order = rank(scores)
    n_R, n_C = sizes.n_R, sizes.n_C
    R = order[..., :n_R].sort(dim=-1).values
    C = order[..., n_R : n_R + n_C].sort(dim=-1).values
    P = order[..., n_R + n_C :].sort(dim=-1).values
    return Partition(R, C, P)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best scores along the last axis (POP's tie-breaking), in ascending order."""
    return rank(scores)[..., :k].sort(dim=-1).values


def keep_set(scores: torch.Tensor, sizes: PartitionSizes) -> torch.Tensor:
    """R ∪ top_{n_keep-n_R}(C by score) = the n_keep best channels: the prefill's own mask ("pruned" prefill)."""
    return top_k(scores, sizes.n_keep)


def candidate_scores(h_c: torch.Tensor, wd_norm_c: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """I_j(t) = |H_t[j]| · ||Wd[:, j]||_2 for the candidates of one decode step.

    ``h_c`` is [B, 1, n_C] or [B, n_C]; over a batch ("batch" scope) |H_t[j]| is
    the L2 norm over the batch's rows ([n_C]); per sequence it is [B, n_C].
    """
    hf = h_c.detach().float().reshape(h_c.shape[0], -1) if h_c.dim() > 1 else h_c.detach().float()[None]
    if per_sequence:
        return hf.abs() * wd_norm_c.float()
    return torch.linalg.vector_norm(hf, dim=0) * wd_norm_c.float()


def select(h_c: torch.Tensor, wd_norm_c: torch.Tensor, n_select: int, per_sequence: bool = False) -> torch.Tensor:
    """Positions (within C) of the candidates one decode step computes: top_{n_select} by I(t)."""
    return top_k(candidate_scores(h_c, wd_norm_c, per_sequence), n_select)


def candidate_topk(h_c: torch.Tensor, wd_norm_c: torch.Tensor, k: int, per_sequence: bool = False) -> torch.Tensor:
    """Positions within C of the k best candidates ([k], or [B, k] per sequence), in no particular order.

    The compiled decode ops' selection: ``torch.topk`` on every device (n_C is a few hundred to a few
    thousand values, where the vendor top-k is one small launch and Inductor calls it without a Python round
    trip). It returns the same set as ``select`` (the stable-sort definition) except among candidates whose
    scores are exactly equal at the boundary.
    """
    scores = candidate_scores(h_c, wd_norm_c.reshape(-1) if not per_sequence else wd_norm_c, per_sequence)
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def weight_only_scores(wd_norm: torch.Tensor, w_in_rows: list[torch.Tensor]) -> torch.Tensor:
    """Data-free importance ||Wd[:, j]|| · Π ||W_in[j, :]|| (POP_SPEC's fallback for an expert with no prefill token)."""
    s = wd_norm.float()
    for w in w_in_rows:
        s = s * torch.linalg.vector_norm(w.detach().float(), dim=-1)
    return s



def expert_scores(h: torch.Tensor, rows: torch.Tensor, wd_norm_e: torch.Tensor, gate_up_e: torch.Tensor, empty_dense: bool) -> torch.Tensor | None:
    """Eq. 3 importance of one expert over ``rows`` of its tokens; POP_SPEC's fallback when none is valid.

    Returns None for "leave this expert dense" (``empty_expert="dense"`` and no token).
    """
    if bool(rows.any()):
        # where() rather than a multiply: a fully masked padding row may hold NaN, and NaN * 0 is NaN.
        return importance(torch.where(rows[:, None], h.detach().float(), 0.0), wd_norm_e)
    if empty_dense:
        return None
    return weight_only_scores(wd_norm_e, list(gate_up_e.chunk(2, dim=0)))


__all__ = [
    "Partition",
    "PartitionSizes",
    "activation_norm",
    "candidate_scores",
    "down_column_norm",
    "expert_scores",
    "candidate_topk",
    "importance",
    "keep_set",
    "partition_sizes",
    "rank",
    "select",
    "split",
    "top_k",
    "weight_only_scores",
]
