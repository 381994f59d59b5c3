"""The pass pipeline of the ``pop`` backend: an ordered list of passes, run on a copy of Dynamo's graph.

``PASSES`` is the order a reader follows (``passes/README.md`` shows it too). Each pass reads and extends one
``_Run`` (the graph copy, the matches so far, the per-site decisions, the state tensors the rewrites
appended) and returns its match count; ``run_passes`` records the counts and returns the rewritten copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from pop_fx import state as _state
from pop_fx.config import PopConfig
from pop_fx.lowbit import VALUES
from pop_fx.state import STATE_NAMES

from passes.classify_graph import reads_kv_cache
from passes.decide import Decision, decide
from passes.graph import add_state_placeholders, copy_graph_module, padding_note
from passes.match_experts import match_experts
from passes.match_ffn import match_ffns
from passes.match_vision import split_vision_tower
from passes.name_shared_experts import name_shared_experts
from passes.nodes import token_input, val
from passes.rewrite_decode import rewrite_decode
from passes.rewrite_experts import rewrite_experts
from passes.rewrite_prefill import rewrite_prefill
from passes.rewrite_proxy import proxy_support, rewrite_decode_proxy, rewrite_decode_values


@dataclass
class Rewritten:
    gm: fx.GraphModule
    """a rewritten copy of Dynamo's graph (the original is untouched)"""
    sites: list
    skipped: list
    state_tensors: list[torch.Tensor]
    """the real tensors for the placeholders the rewrite appended, in order"""
    counts: dict[str, int]
    passes: list[tuple[str, int]] = field(default_factory=list)
    """(pass name, its match count) in the order they ran"""
    states: list = field(default_factory=list)
    """the site states this graph reads (decode) or writes (prefill)"""
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
    states: list = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


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
        if s.param is not None:
            _state.note(s.param, r.cfg, None, s.reason, path=s.path, graph=r.phase)
    r.counts.update(matched=len(r.sites), skipped=len(r.skipped), prefill=0, decode=0)
    r.plan = [decide(m, kind, r.cfg) for m, kind in zip(r.sites, r.kinds)]
    for d in r.plan:
        if d.action == "prefill":
            why = padding_note(r.gm, val(d.site.h).shape[0] if d.site.batch_source is None else val(d.site.batch_source).shape[0])
            if why:
                d.reason = f"pop ({why})"
    for d in r.plan:
        if d.action == "dense":
            _state.note(d.site.param, r.cfg, d.kind, d.reason, path=d.site.path, matched=True, graph=r.phase)
    return sum(d.action != "dense" for d in r.plan)


def _site_state(r: _Run, d: Decision) -> tuple[_state.SiteState, dict[str, fx.Node]]:
    """The site's state (created on first use) and its placeholders in this graph."""
    m = d.site
    w_a, b_a, w_b, b_b = (_real(n) for n in m.weights())
    # "int8-values" reads the original down weight and copies made once: its sites need no R ∪ C layouts, so no
    # prefill copies the FFN (the prefill and decode graphs of a site reach the same answer from the same match).
    layouts = not (r.cfg.candidate_proxy == VALUES and not isinstance(proxy_support(m), str))
    st = _state.get_or_create(m.param, r.cfg, kind=d.kind, d_ff=m.d_ff, d_model=m.d_model, flags=m.flags,
                              n_in=m.n_inputs, in_dtype=w_a.dtype, weights=dict(w_a=w_a, b_a=b_a, w_b=w_b, b_b=b_b),
                              layouts=layouts)
    st.info.update(pattern=m.pattern.name, activation=m.activation, path=m.path)
    nodes = add_state_placeholders(r.gm, st.tensors, f"pop_site{r.sites.index(m)}", STATE_NAMES)
    r.state_tensors.extend(st.tensors[name] for name in STATE_NAMES)
    r.states.append(st)
    return st, nodes


def _rewritten(r: _Run, d: Decision, st: _state.SiteState, graph_kind: str) -> None:
    st.graphs.add(graph_kind)
    r.counts[graph_kind] += 1
    _state.note(d.site.param, r.cfg, d.kind, d.reason, path=d.site.path, matched=True, graph=graph_kind)


def _rewrite_prefill(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "prefill"]
    for d in todo:
        st, nodes = _site_state(r, d)
        rewrite_prefill(r.gm, d.site, st, nodes)
        _rewritten(r, d, st, "prefill")
    return len(todo)


def _rewrite_decode(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "decode"]
    for d in todo:
        st, nodes = _site_state(r, d)
        if r.cfg.scope == "batch" and not st.tensors["w_in"].numel():
            raise RuntimeError(f"site {d.site.path}: a decode graph needs the R ∪ C layouts its state was created "
                               "without (candidate_proxy='int8-values' judged the site supported in another graph)")
        rewrite_decode(r.gm, d.site, st, nodes)
        _rewritten(r, d, st, "decode")
    return len(todo)


def _rewrite_proxy(r: _Run) -> int:
    todo = [d for d in r.plan if d.action == "proxy"]
    for d in todo:
        st, nodes = _site_state(r, d)
        gate, act = d.proxy
        w_a, _, w_b, _ = (_real(n) for n in d.site.weights())
        tables = st.ensure_proxy(*((w_a, w_b) if gate == 0 else (w_b, w_a)))
        names = ("q", "s", "wd_t") if r.cfg.candidate_proxy == VALUES else ("q", "s")
        proxy_nodes = add_state_placeholders(r.gm, tables, f"pop_site{r.sites.index(d.site)}_proxy", names)
        r.state_tensors.extend(tables[name] for name in names)
        rewrite = rewrite_decode_values if r.cfg.candidate_proxy == VALUES else rewrite_decode_proxy
        rewrite(r.gm, d.site, st, nodes, proxy_nodes, act)
        _rewritten(r, d, st, "decode")
    return len(todo)


def _rewrite_experts(r: _Run) -> int:
    tensors, states = rewrite_experts(r.gm, r.experts, r.experts_skipped, r.cfg, r.counts, r.phase)
    r.state_tensors.extend(tensors)
    r.states.extend(states)
    return r.counts.get("experts_prefill", 0) + r.counts.get("experts_decode", 0)


PASSES: tuple[Pass, ...] = (
    Pass("classify_graph", "decode graph = one token per sequence on a KV cache (a one-token prompt's first forward is a prefill)", _classify_graph),
    Pass("match_ffn", "FFN sites by their down projection: passes/match_ffn.py PATTERNS", _match_ffn),
    Pass("match_vision", "FFNs under a vision tower stay dense (they run only in prefill)", _match_vision),
    Pass("match_experts", "routed-experts regions (3-D gate_up_proj/down_proj, grouped_mm or batched_mm)", _match_experts),
    Pass("name_shared_experts", "gated sites beside routed experts are kind shared_expert", _name_shared),
    Pass("decide", "per site: rewrite (prefill / decode / proxy) or dense, with the reason", _decide),
    Pass("rewrite_prefill", "prefill graphs: down(H) -> pop.prefill (partition + layouts into the state)", _rewrite_prefill),
    Pass("rewrite_decode", "decode graphs: gate/up over the R∪C layout, down -> pop.decode / pop.decode_seq", _rewrite_decode),
    Pass("rewrite_proxy", "decode graphs, candidate_proxy: pop.proxy_select + pop.gather_in + pop.decode_sel "
         "(\"int8-values\": the whole FFN -> pop.values_decode)", _rewrite_proxy),
    Pass("rewrite_experts", "experts regions -> pop.experts_prefill / pop.experts_decode", _rewrite_experts),
)


def run_passes(gm: fx.GraphModule, cfg: PopConfig) -> Rewritten:
    """Run ``PASSES`` on a copy of ``gm``: prefill graphs get pop::prefill, decode graphs R∪C + pop::decode."""
    if cfg.candidate_proxy is not None and cfg.scope != "batch":
        raise ValueError(f"PopConfig.candidate_proxy={cfg.candidate_proxy!r} with scope={cfg.scope!r}: the compiled "
                         "proxy ops serve scope='batch' only (pop_fx.reference.pruned runs both scopes)")
    r = _Run(copy_graph_module(gm), cfg)
    done = [(p.name, p.run(r)) for p in PASSES]
    r.gm.graph.lint()
    r.gm.recompile()
    return Rewritten(r.gm, r.sites, r.skipped, r.state_tensors, r.counts, done, r.states, r.phase)


def _real(node: fx.Node | None) -> torch.Tensor | None:
    """The real tensor behind a weight/bias placeholder (None for a missing bias)."""
    if node is None:
        return None
    ga = node.meta.get("grapharg")
    t = getattr(ga, "example", None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{node.name} is not a graph input with a real tensor")
    return t


__all__ = ["PASSES", "Pass", "Rewritten", "run_passes"]
