"""Per-step candidate selection: the n_select best candidates of one decode step.

Scores are ``pop_fx.partition.candidate_scores`` (the one definition: |H_t[j]|, over a batch the L2
norm over its rows, times ||Wd[:, j]||). Selection uses ``torch.topk`` on every device: n_C is a few
hundred to a few thousand values, where the vendor top-k is a single small launch and Inductor calls
it without a Python round trip. It returns the same set as ``pop_fx.partition.select`` (the stable-sort
definition) except among candidates whose scores are exactly equal at the boundary, which then
contribute identically up to their weights' norms (for ReLU's zeros: nothing at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.partition import candidate_scores, select


def candidate_topk(h_c: Tensor, wd_norm_c: Tensor, k: int, per_sequence: bool = False) -> Tensor:
    """Positions within C of the k best candidates ([k], or [B, k] per sequence), in no particular order."""
    scores = candidate_scores(h_c, wd_norm_c.reshape(-1) if not per_sequence else wd_norm_c, per_sequence)
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def candidate_topk_reference(h_c: Tensor, wd_norm_c: Tensor, k: int, per_sequence: bool = False) -> Tensor:
    """The definition (POP_SPEC's tie-breaking), ascending positions."""
    return select(h_c, wd_norm_c.reshape(-1) if not per_sequence else wd_norm_c, k, per_sequence)
