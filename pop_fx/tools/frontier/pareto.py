"""The Pareto front of measured points and the pick inside a quality budget (pure: tested on synthetic frontiers)."""

from __future__ import annotations

import math
from typing import Sequence

from pop_fx.tools.frontier.settings import Budget, Point


def quality_key(p: Point, metric: str) -> float:
    """Smaller is better."""
    return p.ppl_ratio if metric == "ppl" else -p.agreement


def usable(p: Point) -> bool:
    return all(math.isfinite(v) for v in (p.tokens_per_s, p.ppl_ratio, p.agreement))


def pareto_front(points: Sequence[Point], metric: str = "ppl") -> list[bool]:
    """For each point: no other point is at least as fast and at least as good, and strictly better in one."""
    out = []
    for p in points:
        if not usable(p):
            out.append(False)
            continue
        qp = quality_key(p, metric)
        dominated = any(
            usable(o) and o.tokens_per_s >= p.tokens_per_s and quality_key(o, metric) <= qp
            and (o.tokens_per_s > p.tokens_per_s or quality_key(o, metric) < qp)
            for o in points if o is not p
        )
        out.append(not dominated)
    return out


def recommend(points: Sequence[Point], budget: Budget) -> Point | None:
    """The fastest point inside the budget (ties: the better quality, then the lower sparsity); None if none is."""
    inside = [p for p in points if usable(p) and budget.admits(p)]
    if not inside:
        return None
    return max(inside, key=lambda p: (p.tokens_per_s, -quality_key(p, budget.metric), -p.setting.sparsity))


__all__ = ["pareto_front", "quality_key", "recommend", "usable"]
