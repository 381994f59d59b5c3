"""Rewrite matched sites into ``pop::`` ops (prefill graphs) or R∪C layouts + ``pop::`` ops (decode graphs).

Prefill graph (more than one token per sequence)::

    H = act(up(x)) [· up2(x)]                 # unchanged: dense gate/up over all channels
    y = pop.prefill(H, attention_mask, Wd, bd, W_up…, b_up…, state…)   # was: down(H)

Decode graph (one token per sequence), scope="batch"::

    z = linear(x, state.w_in[, state.b_in])   # was: up(x) [and up2(x)] over all d_ff channels (b_in iff a bias)
    g, u = z[..., :n_RC], z[..., n_RC:]       # gated only (fused gate_up keeps its chunk)
    H_rc = act(g) [· u]                       # the same elementwise nodes, now n_R + n_C wide
    y = pop.decode(H_rc, state.wd_t, bd, state.wd_norm_c, n_R, n_select)   # was: down(H)

Decode graph, scope="sequence": gate/up stay dense over all channels (one GEMM for the batch) and
``pop.decode_seq`` selects each sequence's candidates from its own R ∪ C and projects down.

State tensors enter the graph as new placeholders (appended after Dynamo's);
the backend's wrapper passes the real tensors at every call.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx import ops
from pop_fx.state import STATE_NAMES, SiteState

from passes.match_ffn import SiteMatch, _is_activation, val

pop = torch.ops.pop


def site_flags(m: SiteMatch) -> int:
    return (ops.FUSED if m.kind == "fused_gated" else 0) | (ops.CONV1D if m.conv1d else 0)


def n_inputs(m: SiteMatch) -> int:
    """Gate/up weight blocks per channel: 2 for gated kinds, 1 for plain."""
    return 2 if m.kind in ("gated", "fused_gated") else 1


def site_weights(m: SiteMatch):
    """(w_a, b_a, w_b, b_b) graph nodes in the order ``pop_fx.ops`` lays them out."""
    s = m.sources
    if m.kind == "gated":
        return s[0].weight, s[0].bias, s[1].weight, s[1].bias
    return s[0].weight, s[0].bias, None, None


def add_state_placeholders(gm: fx.GraphModule, tensors: dict, prefix: str, names=STATE_NAMES) -> dict[str, fx.Node]:
    """One placeholder per state tensor ``tensors[name]``, after all others; static inputs for Inductor."""
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    nodes = {}
    with g.inserting_after(last):
        for name in reversed(names):
            ph = g.placeholder(f"{prefix}_{name}")
            ph._dynamo_source = None  # AOT refuses an unknown source; None marks "not from user code"
            ph.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            ph.meta["example_value"] = tensors[name]
            ph.meta["pop_state"] = name
            nodes[name] = ph
    return nodes


def _replace_down(g: fx.Graph, m: SiteMatch, y: fx.Node) -> None:
    """Make ``y`` ([..., tokens, d_out], H's leading dims) stand where the down projection was."""
    dv = val(m.down)
    y_dim = 3 if y.target is pop.prefill.default else val(m.h).dim()
    out = y
    if dv is not None and dv.dim() != y_dim:
        with g.inserting_after(y):
            out = g.call_function(torch.flatten, (y, 0, y_dim - dv.dim()))
    m.down.replace_all_uses_with(out)
    g.erase_node(m.down)
    for v in m.h_views:
        if not v.users:
            g.erase_node(v)


def _attention_mask(gm: fx.GraphModule) -> fx.Node | None:
    """The [batch, keys] attention mask input, when the graph has one (it carries the left padding)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "attention_mask" in n.name:
            v = val(n)
            if v is not None and v.dim() == 2:
                return n
    return None


def rewrite_prefill(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node]) -> None:
    g = gm.graph
    cfg = st.config
    w_a, b_a, w_b, b_b = site_weights(m)
    with g.inserting_before(m.down):
        h = m.h
        if val(h).dim() == 2:  # [B·L, d_ff] -> [B, L, d_ff]: importance is per token of each sequence
            b = g.call_method("size", (m.batch_source, 0))
            h = g.call_method("view", (h, b, -1, m.d_ff))
        y = g.call_function(
            pop.prefill.default,
            (h, _attention_mask(gm), m.down_weight, m.down_bias, w_a, b_a, w_b, b_b,
             state["wd_norm"], state["rc_idx"], state["wd_norm_c"], state["w_in"], state["b_in"], state["wd_t"],
             st.sizes.n_keep, st.sizes.n_R, st.sizes.n_C, st.flags,
             cfg.scope == "sequence", cfg.prefill == "pruned"),
        )
    _replace_down(g, m, y)


def rewrite_decode(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node]) -> None:
    g = gm.graph
    sizes = st.sizes
    n_rc = sizes.n_R + sizes.n_C
    per_seq = st.config.scope == "sequence"
    src0 = m.sources[0]
    x = src0.x
    if per_seq:
        # Gate/up stay dense (one GEMM serves the batch; per-sequence copies would not fit in memory);
        # selection and the down projection are per sequence.
        with g.inserting_before(m.down):
            y = g.call_function(pop.decode_seq.default,
                                (m.h, m.down_weight, m.down_bias, state["wd_norm"], state["rc_idx"],
                                 sizes.n_R, sizes.n_select, st.flags))
        _replace_down(g, m, y)
        return
    # 1. gate/up over R ∪ C only: one projection over the contiguous layout replaces the site's one or two.
    anchor = min((s.proj for s in m.sources), key=lambda n: list(g.nodes).index(n))
    _, b_a, _, b_b = site_weights(m)
    b_in = state["b_in"] if (b_a is not None or b_b is not None) else None  # no bias: a plain mm, not addmm(0, …)
    with g.inserting_before(anchor):
        z = g.call_function(torch._C._nn.linear, (x, state["w_in"], b_in))
    if m.kind == "fused_gated":
        src0.proj.replace_all_uses_with(z)  # the chunk(2) that follows still splits gate | up
    elif m.kind == "gated":
        with g.inserting_after(z):
            parts = [g.call_function(torch.narrow, (z, -1, i * n_rc, n_rc)) for i in range(2)]
        for s, p in zip(m.sources, parts):
            s.leaf.replace_all_uses_with(p)
    elif src0.conv1d:
        src0.proj.replace_all_uses_with(z)
        v = src0.view_after  # its target shape names d_ff explicitly: narrow it to |R ∪ C|
        args = list(v.args)
        if len(args) == 2 and isinstance(args[1], (tuple, list)):
            args[1] = type(args[1])(list(args[1])[:-1] + [n_rc])
        else:
            args[-1] = n_rc
        v.args = tuple(args)
    else:
        src0.leaf.replace_all_uses_with(z)
    for s in m.sources:
        for n in (s.leaf, s.proj):
            if n in g.nodes and not n.users and n is not z:
                g.erase_node(n)
    # Chunk getitems of a fused projection were leaves: they stay (they now split z).
    # 2. down over R ∪ selected candidates.
    with g.inserting_before(m.down):
        y = g.call_function(pop.decode.default,
                            (m.h, state["wd_t"], m.down_bias, state["wd_norm_c"], sizes.n_R, sizes.n_select))
    _replace_down(g, m, y)


def gate_source(m: SiteMatch) -> int | None:
    """Which of a gated site's two sources passes through the activation (the gate), or None if unclear."""
    if m.kind != "gated" or len(m.sources) != 2:
        return None
    region = set(m.region)

    def reach(start: fx.Node) -> set:
        seen, stack = set(), [start]
        while stack:
            for u in stack.pop().users:
                if u in region and u not in seen:
                    seen.add(u)
                    stack.append(u)
        return seen

    r0, r1 = (reach(s.leaf) for s in m.sources)
    acts = (any(_is_activation(n) for n in r0 - r1), any(_is_activation(n) for n in r1 - r0))
    return {(True, False): 0, (False, True): 1}.get(acts)


def proxy_support(m: SiteMatch) -> tuple[int, int] | str:
    """(gate source index, activation code) of a decode site the candidate proxy handles, or why not."""
    from pop_fx.activations import ACTIVATIONS

    if m.kind != "gated":
        return f"candidate_proxy: {m.kind} site (gated FFNs with separate gate and up projections only)"
    if m.activation not in ACTIVATIONS:
        return f"candidate_proxy: activation {m.activation} not one of {', '.join(ACTIVATIONS)}"
    gate = gate_source(m)
    if gate is None:
        return "candidate_proxy: cannot tell the gate projection from the up projection"
    return gate, ACTIVATIONS.index(m.activation)


def rewrite_decode_proxy(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node],
                         proxy: dict[str, fx.Node], act: int) -> None:
    """Decode with proxy-scored candidates: rank C from the int8 copy, then gate/up/down over R ∪ chosen only."""
    g = gm.graph
    sizes = st.sizes
    n_rc, n_keep = sizes.n_R + sizes.n_C, sizes.n_keep
    x = m.sources[0].x
    _, b_a, _, b_b = site_weights(m)
    b_in = state["b_in"] if (b_a is not None or b_b is not None) else None
    anchor = min((s.proj for s in m.sources), key=lambda n: list(g.nodes).index(n))
    with g.inserting_before(anchor):
        sel = g.call_function(pop.proxy_select.default, (x, proxy["q"], proxy["s"], state["rc_idx"],
                                                         state["wd_norm_c"], sizes.n_R, sizes.n_select, st.d_ff, act))
        z = g.call_function(pop.gather_in.default, (x, state["w_in"], b_in, sel, sizes.n_R, n_rc, 2))
        parts = [g.call_function(torch.narrow, (z, -1, i * n_keep, n_keep)) for i in range(2)]
    for s, p in zip(m.sources, parts):
        s.leaf.replace_all_uses_with(p)
    for s in m.sources:
        for n in (s.leaf, s.proj):
            if n in g.nodes and not n.users:
                g.erase_node(n)
    with g.inserting_before(m.down):
        y = g.call_function(pop.decode_sel.default, (m.h, state["wd_t"], m.down_bias, sel, sizes.n_R))
    _replace_down(g, m, y)


def pop_ops_in(gm: fx.GraphModule) -> dict[str, int]:
    """Count of each ``pop::`` op in a graph (for tests and reports)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "pop":
            name = n.target._opname
            counts[name] = counts.get(name, 0) + 1
    return counts

