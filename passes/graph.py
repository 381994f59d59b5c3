"""Graph-level helpers the passes share: copying Dynamo's graph, state placeholders, the attention-mask input,
putting a new node where a site's down projection was, and counting ``pop::`` ops.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.nodes import val

pop = torch.ops.pop


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph to rewrite: Dynamo keeps reading the original's placeholders after the backend
    returns (editing it in place raised ``KeyError: grapharg``); the placeholders' ``_dynamo_source`` and the
    graph's ``meta`` come along."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    gm2 = fx.GraphModule(gm, g)
    gm2.meta = dict(gm.meta)
    return gm2


def add_state_placeholders(gm: fx.GraphModule, tensors: dict, prefix: str, names) -> dict[str, fx.Node]:
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


def attention_mask_input(gm: fx.GraphModule) -> fx.Node | None:
    """The [batch, keys] attention mask input, when the graph has one (it carries the left padding)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "attention_mask" in n.name:
            v = val(n)
            if v is not None and v.dim() == 2:
                return n
    return None


def replace_down(g: fx.Graph, m, y: fx.Node) -> None:
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


def pop_ops_in(gm: fx.GraphModule) -> dict[str, int]:
    """Count of each ``pop::`` op in a graph (for tests and reports)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "pop":
            name = n.target._opname
            counts[name] = counts.get(name, 0) + 1
    return counts
