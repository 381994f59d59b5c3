"""The pass pipeline of the ``pop`` backend: an ordered list of passes, run on a copy of Dynamo's graph.

``PASSES`` is the order a reader follows (``passes/README.md`` shows it too). Each pass reads and extends one
``_Run`` (the graph copy, the matches so far, the per-site decisions, the state slots the rewrites appended)
and returns its match count; ``run_passes`` records the counts (also in ``torch._dynamo.utils.counters["pop"]``,
and in the ``pop_fx.passes`` logger) and returns the rewritten copy.

A rewritten graph holds no state: each site gets a ``pop_fx.binding.Slot`` (which graph inputs are its weights,
how to make its state from them) and the backend's ``Binder`` finds the state from the weights of every call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from pop_fx import state as _state
from pop_fx.binding import Note, Slot
from pop_fx.config import PopConfig
from pop_fx.lowbit import VALUES

from passes.classify_graph import reads_kv_cache
from passes.decide import Decision, decide
from passes.graph import add_state_placeholders, copy_graph_module, padding_note
from passes.match_experts import match_experts
from passes.match_ffn import match_ffns, proxy_support
from passes.match_vision import split_vision_tower
from passes.name_shared_experts import name_shared_experts
from passes.nodes import param_of, token_input, val
from passes.rewrite_decode import rewrite_decode
from passes.rewrite_experts import rewrite_experts_decode, rewrite_experts_prefill
from passes.rewrite_prefill import rewrite_prefill
from passes.rewrite_proxy import rewrite_decode_proxy, rewrite_decode_values

log = logging.getLogger("pop_fx.passes")


@dataclass
class Rewritten:
    gm: fx.GraphModule
    """a rewritten copy of Dynamo's graph (the original is untouched)"""
    sites: list
    skipped: list
    state_tensors: list[torch.Tensor]
    """the state tensors of the instance the graph was compiled for, one per appended placeholder (examples: the
    backend's ``Binder`` finds each call's own)"""
    counts: dict[str, int]
    passes: list[tuple[str, int]] = field(default_factory=list)
    """(pass name, its match count) in the order they ran"""
    slots: list[Slot] = field(default_factory=list)
    """per rewritten site, in placeholder order: its weights' input indices and state names"""
    notes: list[Note] = field(default_factory=list)
    """what the graph did with each FFN-like block, for the report of every instance it serves"""
    phase: str = "prefill"
    """the graph's kind: "prefill" or "decode"."""


@dataclass
class _Run:
    gm: fx.GraphModule
    cfg: PopConfig
    cached: bool = True
    """the graph reads a KV cache: one token per sequence is then a decode step"""
    phase: str = "prefill"
    """"prefill" or "decode": which graph this is, for the report"""
    sites: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    experts_skipped: list = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    plan: list[Decision] = field(default_factory=list)
    state_tensors: list[torch.Tensor] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[fx.Node, int] = field(default_factory=dict)
    """Dynamo's placeholders -> their position among the graph's inputs"""

    def note(self, weight: fx.Node | None, kind: str | None, reason: str, path: str, matched: bool = False,
             graph: str | None = None) -> None:
        if weight in self.inputs:
            self.notes.append(Note(self.inputs[weight], kind, reason, path, matched, graph or self.phase))


@dataclass(frozen=True)
class Pass:
    name: str
    does: str
    """one line: what it matches or rewrites"""
    run: Callable[[_Run], int] = field(repr=False, compare=False)


def _classify_graph(r: _Run) -> int:
    r.cached = reads_kv_cache(r.gm)
    ids = token_input(r.gm.graph)
    tokens = val(ids).shape[1] if ids is not None else None
    r.phase = "decode" if isinstance(tokens, int) and tokens == 1 and r.cached else "prefill"
    return int(r.phase == "decode")


def _match_ffn(r: _Run) -> int:
    r.sites, r.skipped = match_ffns(r.gm)
    for m in r.sites:
        m.cached = r.cached
    if r.sites:  # the sites' own token count is the better evidence (a graph may have no input_ids)
        r.phase = "decode" if r.sites[0].is_decode else "prefill"
    return len(r.sites)


def _match_vision(r: _Run) -> int:
    r.sites, vision = split_vision_tower(r.sites)
    r.skipped = r.skipped + vision
    return len(vision)


def _match_experts(r: _Run) -> int:
    r.experts, r.experts_skipped = match_experts(r.gm)
    for m in r.experts:
        m.cached = r.cached
    return len(r.experts)


def _name_shared(r: _Run) -> int:
    r.kinds = name_shared_experts(r.sites, r.experts + r.experts_skipped)
    return r.kinds.count("shared_expert")


def _decide(r: _Run) -> int:
    for s in r.skipped:
        r.note(s.weight, None, s.reason, s.path)
    for s in r.experts_skipped:
        r.note(s.weight, "expert", s.reason, s.path)
    r.counts.update(matched=len(r.sites), skipped=len(r.skipped), prefill=0, decode=0)
    if r.experts or r.experts_skipped:  # dense graphs keep the dense passes' counts unchanged
        r.counts.update(experts=len(r.experts), experts_skipped=len(r.experts_skipped), experts_prefill=0,
                        experts_decode=0)
    r.plan = [decide(m, kind, r.cfg) for m, kind in zip(r.sites, r.kinds)]
    r.plan += [decide(m, "expert", r.cfg) for m in r.experts]
    for d in r.plan:
        if d.action == "prefill":
            m = d.site
            why = padding_note(r.gm, val(m.h).shape[0] if m.batch_source is None else val(m.batch_source).shape[0])
            if why:
                d.reason = f"pop ({why})"
        elif d.action == "dense":
            r.note(d.site.down_weight if hasattr(d.site, "down_weight") else d.site.down, d.kind, d.reason,
                   d.site.path, matched=True)
    return sum(d.action != "dense" for d in r.plan)


def _weights(d: Decision) -> dict[str, fx.Node | None]:
    m = d.site
    if d.action.startswith("experts"):
        return {"gate_up": m.gate_up, "down": m.down}
    w_a, b_a, w_b, b_b = m.weights()
    return {"w_a": w_a, "b_a": b_a, "w_b": w_b, "b_b": b_b, "wd": m.down_weight}


def _site_state(r: _Run, d: Decision, names: tuple[str, ...], prefix: str) -> tuple[_state.State, dict[str, fx.Node]]:
    """The site's slot and placeholders in this graph, and the state of the instance being compiled (whose
    tensors stand as the placeholders' example values)."""
    m = d.site
    nodes = _weights(d)
    weights = tuple((name, None if n is None else r.inputs[n]) for name, n in nodes.items())
    spec = None
    if not d.action.startswith("experts"):
        # The prefill and decode graphs of a site must make the same state, whichever runs first: both read the
        # proxy's support off the match. "int8-values" reads the original down weight and copies made once: its
        # sites need no R ∪ C layouts, so no prefill copies the FFN.
        sup = proxy_support(m) if r.cfg.candidate_proxy is not None else "no proxy"
        gate = None if isinstance(sup, str) else sup[0]
        layouts = not (r.cfg.candidate_proxy == VALUES and gate is not None)
        spec = _state.SiteSpec(d.kind, m.d_ff, m.d_model, m.flags, m.n_inputs, layouts, gate)
        info = dict(pattern=m.pattern.name, activation=m.activation, path=m.path)
    else:
        info = dict(path=m.path, activation=m.activation, pattern=f"Experts[{m.implementation}]")
    slot = Slot(r.cfg, spec, weights, names, "decode" if d.action in ("decode", "proxy", "experts_decode") else "prefill",
                info)
    st, tensors = slot.resolve({i: param_of(n) for n, i in r.inputs.items()})
    placeholders = add_state_placeholders(r.gm, dict(zip(names, tensors)), prefix, names)
    r.slots.append(slot)
    r.state_tensors.extend(tensors)
    r.counts[slot.phase if spec is not None else f"experts_{slot.phase}"] += 1
    r.note(nodes["wd" if spec is not None else "down"], d.kind, d.reason, m.path, matched=True, graph=slot.phase)
    return st, placeholders


def _rewrite_prefill(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "prefill"]
    for d in todo:
        st, nodes = _site_state(r, d, _state.STATE_NAMES, f"pop_site{r.sites.index(d.site)}")
        rewrite_prefill(r.gm, d.site, st, nodes)
    return len(todo)


def _rewrite_decode(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "decode"]
    for d in todo:
        st, nodes = _site_state(r, d, _state.STATE_NAMES, f"pop_site{r.sites.index(d.site)}")
        rewrite_decode(r.gm, d.site, st, nodes)
    return len(todo)


def _rewrite_proxy(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "proxy"]
    values = r.cfg.candidate_proxy == VALUES
    for d in todo:
        names = _state.STATE_NAMES + (_state.VALUES_NAMES if values else _state.PROXY_NAMES)
        st, nodes = _site_state(r, d, names, f"pop_site{r.sites.index(d.site)}")
        (rewrite_decode_values if values else rewrite_decode_proxy)(r.gm, d.site, st, nodes, nodes, d.proxy[1])
    return len(todo)


def _rewrite_experts(r: _Run) -> int:
    todo = [d for d in r.plan if d.action.startswith("experts")]
    for d in todo:
        st, nodes = _site_state(r, d, _state.EXPERT_STATE_NAMES, f"pop_experts{r.experts.index(d.site)}")
        (rewrite_experts_decode if d.action == "experts_decode" else rewrite_experts_prefill)(r.gm, d.site, st, nodes)
    return len(todo)


PASSES: tuple[Pass, ...] = (
    Pass("classify_graph", "decode graph = one token per sequence on a KV cache (a one-token prompt's first forward is a prefill)", _classify_graph),
    Pass("match_ffn", "FFN sites by their down projection: passes/match_ffn.py PATTERNS", _match_ffn),
    Pass("match_vision", "FFNs under a vision tower stay dense (they run only in prefill)", _match_vision),
    Pass("match_experts", "routed-experts regions (3-D gate_up_proj/down_proj, grouped_mm or batched_mm)", _match_experts),
    Pass("name_shared_experts", "gated sites beside routed experts are kind shared_expert", _name_shared),
    Pass("decide", "per site and experts module: rewrite (prefill / decode / proxy / experts) or dense, with the reason", _decide),
    Pass("rewrite_prefill", "prefill graphs: down(H) -> pop.prefill (partition + layouts into the state)", _rewrite_prefill),
    Pass("rewrite_decode", "decode graphs: gate/up over the R∪C layout, down -> pop.decode / pop.decode_seq", _rewrite_decode),
    Pass("rewrite_proxy", "decode graphs, candidate_proxy: pop.proxy_select + pop.gather_in + pop.decode_sel "
         "(\"int8-values\": the whole FFN -> pop.values_decode)", _rewrite_proxy),
    Pass("rewrite_experts", "experts regions -> pop.experts_prefill / pop.experts_decode", _rewrite_experts),
)


def run_passes(gm: fx.GraphModule, cfg: PopConfig) -> Rewritten:
    """Run ``PASSES`` on a copy of ``gm``: prefill graphs get pop::prefill, decode graphs R∪C + pop::decode."""
    cfg.check_compiled()
    from torch._dynamo.utils import counters

    r = _Run(copy_graph_module(gm), cfg)
    r.inputs = {n: i for i, n in enumerate(n for n in r.gm.graph.nodes if n.op == "placeholder")}
    done = []
    for p in PASSES:
        n = p.run(r)
        done.append((p.name, n))
        counters["pop"][p.name] += n
        log.debug("%s: %d", p.name, n)
    counters["pop"][f"{r.phase}_graphs"] += 1
    r.gm.graph.lint()
    r.gm.recompile()
    log.info("%s graph: %s", r.phase, r.counts)
    return Rewritten(r.gm, r.sites, r.skipped, r.state_tensors, r.counts, done, r.slots, r.notes, r.phase)


__all__ = ["PASSES", "Pass", "Rewritten", "run_passes"]
