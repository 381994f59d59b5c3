"""Layer-adaptive budgets: how many channels each site keeps, chosen at prefill from the prompt's own scores.

POP keeps ``n_keep = round((1 - r)·d_ff)`` channels in every FFN (docs/spec.md). ``PopConfig.budget`` other than
"uniform" moves channels between sites under the same total: after the prefill has scored every site (Eq. 3),
each site gets one of a few *bucket* sizes ``n_keep + k·Δ`` (``Δ = round(STEP·d_ff)``, ``|k| <= MAX_STEPS``), and
the buckets are chosen to minimize the sum of the sites' estimated losses under ``Σ k = 0`` over the sites of one
``d_ff``: the total number of kept channels, hence the FFN bytes read per decode step, is exactly the uniform
one. Beyond the paper; no data, no training: everything comes from the prompt being served.

The loss of a site keeping its ``n`` best channels, from its importance scores ``I`` (``rule``):

* ``"mass"``: the share of the prompt's importance energy ``Σ I_j²`` outside the top ``n``. A site whose top
  channels hold less of its mass gets more of the budget.
* ``"energy"``: the importance energy ``Σ I_j²`` outside the top ``n`` itself, not its share: every FFN writes
  into the same residual stream, so the sites trade in one currency (a site with large scores outside its top
  ``n`` gets more, whatever its own total).

``solve`` is the allocator: it starts from the uniform buckets and moves one step at a time from the site that
loses least by giving it up to the site that gains most by taking it, while the gain is strictly larger than
the loss. Identical sites never trade (on a convex loss a site's gain from one more step never exceeds another
identical site's loss from one step less), so identical scores give the uniform allocation; ties go to the
lower site index. Every decode shape stays static per site: a site's sizes are fixed at prefill, and all
buckets share ``n_C`` and ``n_select`` (``partition.sizes_for_keep``); only ``n_R`` differs between buckets.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from pop_fx.partition import PartitionSizes, sizes_for_keep

BUDGETS = ("uniform", "mass", "energy")
"""PopConfig.budget values: "uniform" is the paper's (every site keeps round((1 - r)·d_ff))."""

STEP = 0.05
"""Bucket step as a fraction of d_ff (SmolLM2: 77 of 1536 channels)."""

MAX_STEPS = 4
"""Buckets per site: n_keep + k·Δ for |k| <= MAX_STEPS, i.e. r ± 0.2 at STEP = 0.05 (9 decode shapes at most)."""


def bucket_keeps(d_ff: int, sparsity: float, candidate_ratio: float, step: float | None = None,
                 max_steps: int | None = None) -> tuple[list[int], int]:
    """(n_keep of each allowed bucket, ascending; index of the uniform one) for one site.

    Buckets are ``n_u + k·Δ`` with ``n_u = round((1 - r)·d_ff)``, ``Δ = max(1, round(step·d_ff))``, and only those
    whose sizes keep the uniform bucket's n_C and n_select (``sizes_for_keep``; ``step`` and ``max_steps`` default
    to STEP and MAX_STEPS): so the candidate band and the
    per-step selection are the same in every bucket, and 1 <= n_keep <= d_ff - 1 (never dense, never empty).
    """
    step = STEP if step is None else step
    max_steps = MAX_STEPS if max_steps is None else max_steps
    n_u = round((1 - float(sparsity)) * d_ff)
    base = sizes_for_keep(d_ff, n_u, candidate_ratio)
    delta = max(1, round(step * d_ff))
    keeps = []
    for k in range(-max_steps, max_steps + 1):
        n = n_u + k * delta
        if not 1 <= n <= d_ff - 1:
            continue
        sz = sizes_for_keep(d_ff, n, candidate_ratio)
        if k == 0 or (sz.n_C == base.n_C and sz.n_select == base.n_select):
            keeps.append(n)
    return keeps, keeps.index(n_u) if n_u in keeps else -1


def tail_energy(scores: torch.Tensor, keeps: Sequence[int]) -> torch.Tensor:
    """Σ_{j outside the top n} I_j² for each n in ``keeps`` (float64; NaN counts as 0, as in importance)."""
    e = torch.nan_to_num(scores.detach().double(), nan=0.0).square()
    e = torch.sort(e, descending=True).values
    total = e.sum()
    cum = torch.cat([e.new_zeros(1), e.cumsum(0)])
    return total - cum[torch.tensor(list(keeps))]


def _mass(scores: torch.Tensor, keeps: Sequence[int]) -> list[float]:
    tail = tail_energy(scores, keeps)
    total = tail.new_tensor(0.0) + torch.nan_to_num(scores.detach().double(), nan=0.0).square().sum()
    if not total > 0 or not math.isfinite(float(total)):
        return [0.0] * len(keeps)  # no mass (no real token, or all NaN): it loses nothing by giving
    return (tail / total).tolist()


def _energy(scores: torch.Tensor, keeps: Sequence[int]) -> list[float]:
    return tail_energy(scores, keeps).tolist()


RULES: dict[str, Callable[[torch.Tensor, Sequence[int]], list[float]]] = {"mass": _mass, "energy": _energy}
"""budget name -> loss of one site for each of its buckets, from its scores ([d_ff])."""


def solve(losses: Sequence[Sequence[float]], start: Sequence[int]) -> list[int]:
    """Bucket index per site minimizing Σ losses[s][k_s] with Σ (k_s - start[s]) = 0, by single-step exchanges.

    ``losses[s]`` is site s's loss at each of its buckets (ascending sizes); ``start[s]`` its uniform bucket. A
    step moves from the donor (smallest loss increase from one bucket down) to the taker (largest decrease from
    one bucket up) while the decrease is strictly larger (by more than 1e-9 of the largest loss). Ties: the lowest site index. On convex losses the
    result is optimal; it is deterministic always.
    """
    k = list(start)
    n = len(k)
    # A trade must beat rounding: identical sites on a straight stretch of their loss differ only in the last bits.
    tol = 1e-9 * max((abs(x) for loss in losses for x in loss if math.isfinite(x)), default=0.0)
    for _ in range(sum(len(x) for x in losses) * max(n, 1)):  # each move lowers Σ loss: a bound, never reached
        best_up, gain = -1, -math.inf
        for s in range(n):
            if k[s] + 1 < len(losses[s]):
                g = losses[s][k[s]] - losses[s][k[s] + 1]
                if g > gain:
                    best_up, gain = s, g
        if best_up < 0:
            break
        best_down, cost = -1, math.inf
        for s in range(n):
            if s != best_up and k[s] > 0:
                c = losses[s][k[s] - 1] - losses[s][k[s]]
                if c < cost:
                    best_down, cost = s, c
        if best_down < 0 or not gain > cost + tol:
            break
        k[best_up] += 1
        k[best_down] -= 1
    return k


def allocate(rule: str, scores: Sequence[torch.Tensor], d_ffs: Sequence[int], sparsity: float,
             candidate_ratio: float) -> list[PartitionSizes]:
    """Each site's partition sizes under ``rule``, from its prefill scores ([d_ff] each). Sites are allocated
    within groups of equal d_ff, so each group keeps exactly its uniform total of channels."""
    if rule not in BUDGETS:
        raise ValueError(f"budget={rule!r} is invalid: allowed one of {list(BUDGETS)}")
    uniform = [sizes_for_keep(f, round((1 - float(sparsity)) * f), candidate_ratio) for f in d_ffs]
    if rule == "uniform":
        return uniform
    out = list(uniform)
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(d_ffs):
        groups.setdefault(int(f), []).append(i)
    for f, members in groups.items():
        keeps, start = bucket_keeps(f, sparsity, candidate_ratio)
        if start < 0 or len(members) < 2:
            continue
        losses = [RULES[rule](scores[i], keeps) for i in members]
        chosen = solve(losses, [start] * len(members))
        for i, b in zip(members, chosen):
            out[i] = sizes_for_keep(f, keeps[b], candidate_ratio)
    return out


__all__ = ["BUDGETS", "MAX_STEPS", "RULES", "STEP", "allocate", "bucket_keeps", "solve", "tail_energy"]
