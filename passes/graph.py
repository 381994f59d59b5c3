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
    returns (editing it in place raised ``KeyError: grapharg``); the placeholders' ``_dynamo_source``, the
    graph's ``meta`` and Dynamo's attributes come along."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    gm2 = fx.GraphModule(gm, g)
    gm2.meta = dict(gm.meta)
    # AOT reads Dynamo's metadata off these attributes: without them it takes the copy for an exported graph
    # and marks no input static, so CUDA graphs would copy every weight and state tensor on each replay.
    for attr in DYNAMO_GRAPH_ATTRS:
        if hasattr(gm, attr):
            setattr(gm2, attr, getattr(gm, attr))
    return gm2


DYNAMO_GRAPH_ATTRS = ("_param_name_to_source", "_source_to_user_stacks")
"""What Dynamo sets on the GraphModule it hands a backend besides ``meta`` (torch/_dynamo/output_graph.py)."""


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
    """The attention-mask input that carries the padding (``pop_fx.partition.token_mask`` reads it): a 2-D
    [batch, keys] mask, else a 4-D [batch, heads, queries, keys] one (a static cache's), the full-attention one
    of a per-kind dict first. None when the graph has none (see ``padding_note``)."""
    masks = [n for n in gm.graph.nodes if n.op == "placeholder" and "attention_mask" in n.name and val(n) is not None]
    for rank, prefer in ((2, ""), (4, "full"), (4, "")):
        for n in masks:
            if val(n).dim() == rank and prefer in n.name:
                return n
    return None


def padding_note(gm: fx.GraphModule, batch: int) -> str | None:
    """Why a prefill of this graph cannot tell padding from tokens, or None if it can (or nothing is padded).

    A graph with no mask input has no padding the model itself sees. A mask input of another form (or of
    another batch size) cannot be read: the report then says "padding unknown" instead of guessing."""
    masks = [n for n in gm.graph.nodes if n.op == "placeholder" and "attention_mask" in n.name]
    if not masks:
        return None
    m = attention_mask_input(gm)
    v = val(m) if m is not None else None
    if v is None or (isinstance(batch, int) and v.shape[0] != batch):
        shapes = [tuple(val(n).shape) if val(n) is not None else None for n in masks]
        return f"padding unknown: attention mask input(s) {shapes} are neither [B, S] nor [B, h, L, S]"
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


def first_of(g: fx.Graph, nodes) -> fx.Node:
    """The node of ``nodes`` that comes first in the graph (where a replacement of all of them is inserted)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    return min(nodes, key=order.__getitem__)


def erase_dead(g: fx.Graph, nodes) -> None:
    """Erase those of ``nodes`` that nothing uses any more, last first (so a chain of dead nodes goes entirely)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in sorted({n for n in nodes if n in order}, key=order.__getitem__, reverse=True):
        if not n.users and n.op in ("call_function", "call_method"):
            g.erase_node(n)


def pop_ops_in(gm: fx.GraphModule) -> dict[str, int]:
    """Count of each ``pop::`` op in a graph (for tests and reports)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "pop":
            name = n.target._opname
            counts[name] = counts.get(name, 0) + 1
    return counts
