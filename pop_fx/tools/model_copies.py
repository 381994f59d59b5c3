"""Compiled copies of one model over the same Parameters, as the benchmarks build them, and the check that a
POP copy is POP at every FFN site before it is timed."""

from __future__ import annotations

import copy

import torch.nn as nn


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every Parameter and buffer with ``model`` (no weight is copied)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def shallow_copy(model: nn.Module) -> nn.Module:
    """A second top-level module over the same submodules: ``compile`` in place touches only the top."""
    clone = copy.copy(model)
    clone.__dict__ = dict(model.__dict__)
    clone._compiled_call_impl = None
    return clone


def require_fully_rewritten(name: str, m: nn.Module) -> None:
    """Refuse to time a POP variant in which some FFN site was not rewritten in both its prefill and decode
    graphs (a graph break, the recompile limit, an unsupported block): its timing would not be POP's."""
    import pop_fx

    rep = pop_fx.report(m)
    missing = [s["path"] for s in rep.sites if set(s["graphs"]) != {"prefill", "decode"}]
    problems = rep.warnings + [f"{d['path']} left dense: {d['reason']}" for d in rep.dense if d.get("matched")] + \
        [f"{p}: rewritten only in {sorted(s['graphs'])}" for p, s in ((s["path"], s) for s in rep.sites) if p in missing]
    if not rep.sites or problems:
        raise RuntimeError(f"pop-fx bench: variant {name!r} is not POP at every FFN site, so it is not timed: "
                           + ("; ".join(problems) if problems else "no site was rewritten"))


__all__ = ["require_fully_rewritten", "shallow_copy", "structural_copy"]
