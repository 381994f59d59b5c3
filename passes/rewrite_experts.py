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

import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx.state import ExpertsState

from passes.graph import attention_mask_input, pop
from passes.match_experts import ExpertsMatch
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
