"""Rewrite routed-experts blocks (see ``match_experts``) into ``pop::`` ops."""

from __future__ import annotations

import torch
import torch.fx as fx

from pop_fx import state as _state
from pop_fx.config import PopConfig

from .match_experts import ExpertsMatch
from .match_ffn import Skipped


def rewrite_experts(gm: fx.GraphModule, experts: list[ExpertsMatch], skipped: list[Skipped], cfg: PopConfig,
                    counts: dict[str, int]) -> list[torch.Tensor]:
    """Record every experts block; returns the state tensors of the placeholders added (none yet)."""
    if experts or skipped:  # dense graphs keep the dense passes' counts unchanged
        counts["experts"] = len(experts)
    for s in skipped:
        if s.param is not None:
            _state.note(s.param, cfg, "expert", s.reason, path=s.path)
    for m in experts:
        _state.note(m.param, cfg, "expert", "routed experts are not rewritten by the compiled backend yet",
                    path=m.path, matched=True)
    return []
