"""Rewrite routed-experts blocks (found by ``match_experts``) into ``pop::experts_*`` ops.

The experts module's whole region is replaced by one op (the router, outside it, is untouched)::

    prefill:  y = pop.experts_prefill(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
                                      attention_mask, B, state…)    # per-expert importance, R/C/P, output
    decode:   y = pop.experts_decode(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, state…)
                                      # each token through its chosen experts, R ∪ selected candidates

State tensors (``pop_fx.state.ExpertsState``) enter as placeholders appended after every other,
like the dense sites' (``passes.graph.add_state_placeholders``), and the backend passes them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx import state as _state
from pop_fx.config import PopConfig
from pop_fx.partition import partition_sizes
from pop_fx.state import EXPERT_STATE_NAMES, ExpertsState

from passes.match_experts import ExpertsMatch
from passes.match_ffn import Skipped
from passes.graph import add_state_placeholders, attention_mask_input, pop
from passes.nodes import is_symbolic_scalar


def _replace_region(g: fx.Graph, m: ExpertsMatch, y: fx.Node) -> None:
    m.output.replace_all_uses_with(y)
    inside = set(m.region)
    # Under dynamic shapes another region may reuse a size expression computed in this one: keep it and
    # whatever it reads here; erase the rest.
    keep, stack = set(), [n for n in m.region if is_symbolic_scalar(n) and any(u not in inside for u in n.users)]
    while stack:
        n = stack.pop()
        if n in inside and n not in keep:
            keep.add(n)
            stack.extend(n.all_input_nodes)
    for n in reversed(m.region):
        if n in keep:
            continue
        if n.users:
            raise RuntimeError(f"experts region of {m.path}: {n.name} is still used after the rewrite")
        g.erase_node(n)


def rewrite_experts_prefill(gm: fx.GraphModule, m: ExpertsMatch, st: ExpertsState, s: dict[str, fx.Node]) -> None:
    g, cfg, z = gm.graph, st.config, st.sizes
    with g.inserting_before(m.output):
        b = g.call_method("size", (m.batch_source, 0))
        y = g.call_function(pop.experts_prefill.default, (
            m.hidden, m.top_k_index, m.top_k_weights, m.gate_up, m.down, attention_mask_input(gm), b,
            s["wd_norm"], s["rc_idx"], s["wd_norm_c"], s["dense"], s["w_in"], s["wd_rc"],
            z.n_keep, z.n_R, z.n_C, m.activation, cfg.scope == "sequence", cfg.prefill == "pruned",
            cfg.empty_expert == "dense"))
    _replace_region(g, m, y)


def rewrite_experts_decode(gm: fx.GraphModule, m: ExpertsMatch, st: ExpertsState, s: dict[str, fx.Node]) -> None:
    g, cfg, z = gm.graph, st.config, st.sizes
    with g.inserting_before(m.output):
        y = g.call_function(pop.experts_decode.default, (
            m.hidden, m.top_k_index, m.top_k_weights, m.gate_up, m.down,
            s["rc_idx"], s["wd_norm_c"], s["dense"], s["w_in"], s["wd_rc"],
            z.n_R, z.n_select, m.activation, cfg.scope == "sequence", cfg.empty_expert == "dense", cfg.kernel_code))
    _replace_region(g, m, y)


def rewrite_experts(gm: fx.GraphModule, experts: list[ExpertsMatch], skipped: list[Skipped], cfg: PopConfig,
                    counts: dict[str, int], phase: str = "prefill") -> tuple[list[torch.Tensor], list[ExpertsState]]:
    """Rewrite every matched experts block; returns the real state tensors of the placeholders added, in order,
    and the states they belong to."""
    if experts or skipped:  # dense graphs keep the dense passes' counts unchanged
        counts.update(experts=len(experts), experts_skipped=len(skipped), experts_prefill=0, experts_decode=0)
    for s in skipped:
        if s.param is not None:
            _state.note(s.param, cfg, "expert", s.reason, path=s.path, graph=phase)
    tensors: list[torch.Tensor] = []
    states: list[ExpertsState] = []
    for i, m in enumerate(experts):
        z = partition_sizes(m.d_ff, cfg.sparsity, cfg.candidate_ratio)
        if z.is_dense:
            _state.note(m.param, cfg, "expert", "dense: every channel kept (sparsity 0)", path=m.path, matched=True,
                        graph=phase)
            continue
        if z.n_keep < 1:
            _state.note(m.param, cfg, "expert", f"dense: d_ff={m.d_ff} too small for sparsity={cfg.sparsity} "
                        "(n_keep < 1)", path=m.path, matched=True, graph=phase)
            continue
        st = _state.get_or_create_experts(m.gate_up_param, m.param, cfg)
        st.info.update(path=m.path, activation=m.activation, pattern=f"Experts[{m.implementation}]")
        nodes = add_state_placeholders(gm, st.tensors, f"pop_experts{i}", EXPERT_STATE_NAMES)
        kind = "decode" if m.is_decode else "prefill"
        (rewrite_experts_decode if m.is_decode else rewrite_experts_prefill)(gm, m, st, nodes)
        st.graphs.add(kind)
        counts[f"experts_{kind}"] += 1
        tensors.extend(st.tensors[name] for name in EXPERT_STATE_NAMES)
        states.append(st)
        _state.note(m.param, cfg, "expert", "pop", path=m.path, matched=True, graph=kind)
    return tensors, states
