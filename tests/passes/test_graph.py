"""passes/graph.py: the graph surgery the passes share."""

import torch
import torch.fx as fx

from passes.graph import (DYNAMO_GRAPH_ATTRS, add_state_placeholders, attention_mask_input, copy_graph_module,
                          erase_dead, first_of, pop_ops_in)


def test_the_copy_keeps_what_dynamo_and_aot_read(llama):
    _, caps = llama
    gm = caps[1].gm
    cp = copy_graph_module(gm)
    assert cp is not gm and cp.code == gm.code and cp.meta == gm.meta
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new = [n for n in cp.graph.nodes if n.op == "placeholder"]
    assert [getattr(n, "_dynamo_source", None) for n in old] == [getattr(n, "_dynamo_source", None) for n in new]
    assert all(getattr(cp, a, None) is getattr(gm, a, None) for a in DYNAMO_GRAPH_ATTRS)


def test_state_placeholders_come_last_as_static_inputs(llama):
    _, caps = llama
    gm = copy_graph_module(caps[1].gm)
    n_before = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    t = {"a": torch.zeros(2), "b": torch.zeros(3)}
    nodes = add_state_placeholders(gm, t, "site0", ("a", "b"))
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert phs[n_before:] == [nodes["a"], nodes["b"]]
    for name, n in nodes.items():
        assert n._dynamo_source is None and n.meta["pop_state"] == name and n.meta["example_value"] is t[name]
        assert n.meta["tensor_dict"]["_dynamo_static_input_type"] == "unguarded"


def test_the_padding_mask_input_is_found(llama):
    _, caps = llama
    m = attention_mask_input(caps[0].gm)
    assert m is not None and "attention_mask" in m.name and m.meta["example_value"].dim() == 2


def test_first_of_and_erase_dead():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.neg, (a,))
    c = g.call_function(torch.sin, (x,))
    g.output(c)
    assert first_of(g, [c, b, a]) is a
    erase_dead(g, [a, b])  # b is dead, and with it a
    assert [n.op for n in g.nodes] == ["placeholder", "call_function", "output"]
    erase_dead(g, [c])  # still used by the output: kept
    assert c in g.nodes


def test_pop_ops_are_counted_by_name(llama):
    from passes.pipeline import run_passes
    from pop_fx import PopConfig

    _, caps = llama
    assert pop_ops_in(caps[1].gm) == {}
    assert pop_ops_in(run_passes(caps[1].gm, PopConfig(lowering="eager")).gm) == {"decode": 2}
