"""The partition core: scores -> (R, C, P) and the per-step candidate selection.

Every execution path (the eager reference, the compiled ops, the kernels'
references, the evaluation harness) calls these functions, so the paths cannot
drift apart. docs/spec.md is the source of every rule here:

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
    """(n_keep, n_R, n_C, n_P) for one site, exactly as docs/spec.md writes them."""
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


def sizes_for_keep(d_ff: int, n_keep: int, candidate_ratio: float) -> PartitionSizes:
    """The sizes of a site that keeps ``n_keep`` channels per step: docs/spec.md's rule with n_keep given instead
    of r (a layer-adaptive budget, ``pop_fx.allocation``). ``partition_sizes(d_ff, r, γ)`` equals
    ``sizes_for_keep(d_ff, round((1 - r)·d_ff), γ)``."""
    for name, v, lo, hi in (("d_ff", d_ff, 1, None), ("n_keep", n_keep, 0, d_ff)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name}={v!r} is invalid: allowed an integer {lo} <= {name}" + (f" <= {hi}" if hi else ""))
    from pop_fx.config import PopConfig

    PopConfig(candidate_ratio=candidate_ratio)  # one place validates ranges
    d_ff, n_keep, gamma = int(d_ff), int(n_keep), float(candidate_ratio)
    n_R = max(0, n_keep - round(gamma / 2 * d_ff))
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


def token_mask(attention_mask, batch: int, tokens: int) -> torch.Tensor | None:
    """[B, L] bool, False = padding, for the L current tokens, from the mask a model's forward receives.

    * 2-D ``[B, S]`` (1 = token): the current tokens are its last L columns;
    * 4-D ``[B, h, L, S]`` (what ``generate()`` builds for a static cache): bool (True = may attend) or
      additive float (0 = may attend, a large negative number = masked). A current token is padding iff it
      may attend to no key: under left padding a padding token sees only padding, and every real token sees
      itself (also under a sliding window);
    * a dict of such masks per attention kind (``{"full_attention": …, "sliding_attention": …}``): the full one.

    None when there is no mask or its shape does not fit [B, L] (nothing to tell padding by).
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape[0] != batch:
        return None
    m = attention_mask
    if m.dim() == 2 and m.shape[1] >= tokens:
        return m[:, -tokens:] != 0
    if m.dim() == 4 and m.shape[2] == tokens:
        allowed = m[:, 0] if m.dtype == torch.bool else m[:, 0] > torch.finfo(m.dtype).min / 2
        return allowed.any(dim=-1)
    return None


def activation_norm(h: torch.Tensor, token_mask: torch.Tensor | None = None, per_sequence: bool = False) -> torch.Tensor:
    """s_j = ||H[T, j]||_2 over the tokens T (in fp32).

    ``h`` is [..., d_ff]; with ``per_sequence`` it is [B, L, d_ff] and the norm
    is taken per sequence ([B, d_ff]). ``token_mask`` ([B, L] or broadcastable
    to h's leading dims; False/0 = padding) removes tokens from T. Padding is removed with ``where``, not a
    multiply (a fully masked row may hold NaN, and NaN·0 is NaN), and a NaN entry counts as 0, so one bad row
    cannot poison a batch's partition.
    """
    hf = h.detach()
    if token_mask is not None:  # where, not a multiply: it also drops whatever a padding row holds (NaN included)
        m = token_mask.to(device=hf.device, dtype=torch.bool)
        hf = torch.where(m.reshape(*m.shape, *([1] * (hf.dim() - m.dim()))), hf,
                         torch.zeros((), dtype=hf.dtype, device=hf.device))
        hf.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))  # the copy where made: NaN -> 0 in place
    else:
        hf = torch.nan_to_num(hf, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    # Two passes over H (three with a mask), each one op: a prefill of L tokens reads H once per pass, and the
    # prefill's time to first token pays for every one of them (isnan/not/and/where/norm were five).
    if per_sequence:
        if hf.dim() < 2:
            raise ValueError(f"per-sequence importance needs [B, L, d_ff] activations, got {tuple(h.shape)}")
        return torch.linalg.vector_norm(hf.reshape(hf.shape[0], -1, hf.shape[-1]), dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(hf.reshape(-1, hf.shape[-1]), dim=0, dtype=torch.float32)


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


def rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """One int64 key per score, unique along the last axis, ordered as ``rank`` orders: a larger key ranks first.

    The high 32 bits are the fp32 score's bits made monotone (IEEE order as signed integers; -0.0 counts as
    0.0, NaN as the lowest), the low 32 bits break ties by the lower index. ``torch.topk`` over these keys picks
    exactly the set the stable sort does, on every device, without a sort.
    """
    s = scores.float() + 0.0  # -0.0 -> +0.0
    bits = s.view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude bits
    bits = torch.where(torch.isnan(s), torch.full_like(bits, -(2 ** 31)), bits)
    n = s.shape[-1]
    tie = (n - 1) - torch.arange(n, device=s.device, dtype=torch.int64)
    return (bits.to(torch.int64) << 32) + tie


def candidate_topk(h_c: torch.Tensor, wd_norm_c: torch.Tensor, k: int, per_sequence: bool = False) -> torch.Tensor:
    """Positions within C of the k best candidates ([k], or [B, k] per sequence), in no particular order.

    The compiled decode ops' selection: ``torch.topk`` over ``rank_keys`` (n_C is a few hundred to a few
    thousand values: one small launch, no sort, no Python round trip), which picks the same set as ``select``
    (docs/spec.md's stable ranking: ties by the lower channel index, NaN last).
    """
    scores = candidate_scores(h_c, wd_norm_c.reshape(-1) if not per_sequence else wd_norm_c, per_sequence)
    return torch.topk(rank_keys(scores), k, dim=-1, sorted=False).indices


def weight_only_scores(wd_norm: torch.Tensor, w_in_rows: list[torch.Tensor]) -> torch.Tensor:
    """Data-free importance ||Wd[:, j]|| · Π ||W_in[j, :]|| (docs/spec.md's fallback for an expert with no prefill token)."""
    s = wd_norm.float()
    for w in w_in_rows:
        s = s * torch.linalg.vector_norm(w.detach().float(), dim=-1)
    return s



def expert_scores(h: torch.Tensor, rows: torch.Tensor, wd_norm_e: torch.Tensor, gate_up_e: torch.Tensor, empty_dense: bool) -> torch.Tensor | None:
    """Eq. 3 importance of one expert over ``rows`` of its tokens; docs/spec.md's fallback when none is valid.

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
    "token_mask",
    "candidate_topk",
    "rank_keys",
    "importance",
    "keep_set",
    "partition_sizes",
    "rank",
    "select",
    "sizes_for_keep",
    "split",
    "top_k",
    "weight_only_scores",
]
