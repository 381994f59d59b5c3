"""passes/nodes.py: what a node of Dynamo's graph is, read off its target and meta."""

import torch
import torch.fx as fx

from passes.nodes import addmm_parts, input_name, is_view, linear_parts, module_path, param_of, token_input, val


def test_weights_are_parameters_and_have_readable_names(llama):
    model, caps = llama
    gm = caps[1].gm
    phs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    down = next(n for name, n in phs.items() if "layers_modules_0_modules_mlp_modules_down_proj" in name)
    assert param_of(down) is model.model.layers[0].mlp.down_proj.weight
    assert input_name(down) == "model.layers.0.mlp.down_proj.weight"
    ids = token_input(gm.graph)
    assert ids is not None and param_of(ids) is None and val(ids).shape[-1] == 1


def test_linear_and_addmm_parts_and_views():
    g = fx.Graph()
    x, w, b = g.placeholder("x"), g.placeholder("w"), g.placeholder("b")
    lin = g.call_function(torch._C._nn.linear, (x, w, b))
    mm = g.call_function(torch.addmm, (b, x, w))
    v = g.call_method("view", (lin, -1))
    g.output((mm, v))
    assert linear_parts(lin) == (x, w, b) and linear_parts(mm) is None
    assert addmm_parts(mm) == (x, w, b) and addmm_parts(lin) is None
    assert is_view(v) and not is_view(lin)
    assert param_of(x) is None and val(x) is None  # no grapharg, no example value: neither breaks


def test_module_path_of_a_site(llama):
    _, caps = llama
    n = next(n for n in caps[1].gm.graph.nodes if n.op == "call_function" and "down_proj" in module_path(n))
    assert module_path(n).startswith("model.layers.")
