"""pop-fx inspect: sites, skipped blocks and ops before/after the rewrite, read from tiny models' graphs."""

import json

import pytest
import torch

from pop_fx import PopConfig
from pop_fx.tools.cli import main
from pop_fx.tools.html_report import svg_graph
from pop_fx.tools.inspect import inspect
from pop_fx.tools.models import tiny_model
from pop_fx.partition import partition_sizes

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, inspect(model, CFG, prompt_len=6, batch=2)


def _ops(rep, graph, when, site=0):
    return rep.sites[site].ops[graph][when]


def test_every_ffn_layer_is_a_site_with_its_sizes(llama):
    model, rep = llama
    assert [s.path for s in rep.sites] == [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]
    sz = partition_sizes(model.config.intermediate_size, CFG.sparsity, CFG.candidate_ratio)
    for s in rep.sites:
        assert (s.kind, s.pattern, s.activation) == ("gated", "GatedLinear", "silu")
        assert (s.d_model, s.d_ff) == (model.config.hidden_size, model.config.intermediate_size)
        assert (s.n_keep, s.n_R, s.n_C, s.n_P) == tuple(sz)
        assert s.rewritten == ["prefill", "decode"] and s.reason == "pop"
    assert rep.skipped == []


def test_pop_ops_per_graph(llama):
    model, rep = llama
    n = model.config.num_hidden_layers
    assert [(g.kind, g.pop_ops) for g in rep.graphs] == [("prefill", {"prefill": n}), ("decode", {"decode": n})]


def test_decode_ops_before_and_after(llama):
    model, rep = llama
    sz = partition_sizes(model.config.intermediate_size, CFG.sparsity, CFG.candidate_ratio)
    before, after = _ops(rep, "decode", "before"), _ops(rep, "decode", "after")
    assert [n.op for n in before.nodes] == ["linear", "silu", "linear", "mul", "linear"]
    assert before.text == ("linear(x, gate_proj.weight, None) -> silu -> mul(·, linear(x, up_proj.weight, None)) "
                           "-> linear(·, down_proj.weight, None)")
    assert sorted(n.op for n in after.nodes) == ["linear", "mul", "narrow", "narrow", "pop.decode", "silu"]
    assert "gate_proj.weight" not in after.inputs and {"w_in", "wd_rc", "wd_norm_c"} <= set(after.inputs)
    # No gate/up bias: the R ∪ C projection is a plain mm, not an addmm with a zero bias.
    assert "b_in" not in after.inputs and after.text.startswith("%0 = linear(x, w_in, None) -> ")
    dec = next(n for n in after.nodes if n.op == "pop.decode")
    assert dec.pop and dec.args[-3:] == [str(sz.n_R), str(sz.n_select), "0"]  # kernels: 0 = the torch ops
    # Shapes of the rewritten graph are its own: the activation is |R ∪ C| wide, the output d_model wide.
    width = {n.op: n.shape for n in after.nodes}
    assert width["silu"] == [2, 1, sz.n_R + sz.n_C] and width["linear"] == [2, 1, 2 * (sz.n_R + sz.n_C)]
    assert width["pop.decode"] == [2, 1, model.config.hidden_size]
    assert {n.op: n.shape for n in before.nodes}["silu"] == [2, 1, model.config.intermediate_size]


def test_prefill_ops_after(llama):
    _, rep = llama
    after = _ops(rep, "prefill", "after")
    assert [n.op for n in after.nodes] == ["linear", "silu", "linear", "mul", "pop.prefill"]
    assert after.text.startswith("linear(x, gate_proj.weight, None) -> silu -> mul(·, linear(x, up_proj.weight, None)) "
                                 "-> pop.prefill(·, ")


def test_cost_summary_of_the_model(llama):
    model, rep = llama
    c = rep.costs
    assert c["expressions"]["gated"]["overhead"] == "γ/3" and c["sites"] == model.config.num_hidden_layers
    sz = partition_sizes(model.config.intermediate_size, CFG.sparsity, CFG.candidate_ratio)
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    assert c["total"]["pop_flops"] == n * 2 * rep.batch * d * (2 * (sz.n_R + sz.n_C) + sz.n_keep)


def test_svg_draws_every_node_and_edge(llama):
    _, rep = llama
    ops = _ops(rep, "decode", "after")
    svg = svg_graph(ops)
    edges = sum(len(dict.fromkeys(n.inputs)) for n in ops.nodes)
    assert svg.count("<rect") == len(ops.nodes) + len(ops.inputs)
    assert svg.count("<path") == edges + 1  # + the arrowhead marker


class _ClampedSilu(torch.nn.Module):
    def forward(self, x):
        return torch.clamp(torch.nn.functional.silu(x), max=4.0)  # clamp: not a whitelisted channel-wise op


def test_skipped_block_and_sparsity_zero():
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = _ClampedSilu()
    rep = inspect(model, PopConfig(sparsity=0.0))
    assert [s.path for s in rep.sites] == ["model.layers.0.mlp"]
    assert rep.sites[0].rewritten == [] and rep.sites[0].reason == "dense: every channel kept (sparsity 0)"
    assert rep.sites[0].ops["decode"]["after"].text == rep.sites[0].ops["decode"]["before"].text
    assert [k["path"] for k in rep.skipped] == ["model.layers.1.mlp.down_proj"]
    assert "clamp" in rep.skipped[0]["reason"] and rep.skipped[0]["graphs"] == ["prefill", "decode"]
    assert all(g.pop_ops == {} for g in rep.graphs)
    assert "left dense (1):" in str(rep) and "clamp" in str(rep)


def test_gpt2_conv1d_site(capsys):
    assert main(["inspect", "gpt2", "--json", "--sparsity", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in out["sites"]] == ["plain", "plain"]
    ops = out["sites"][0]["ops"]["decode"]
    assert [n["op"] for n in ops["before"]["nodes"]][0] == "addmm" and "addmm" not in ops["after"]["text"]
    assert ops["after"]["nodes"][-1]["op"] == "flatten" and ops["after"]["nodes"][-2]["op"] == "pop.decode"
    assert out["costs"]["expressions"] == {"plain": out["costs"]["expressions"]["plain"]}
    assert out["costs"]["expressions"]["plain"]["overhead"] == "γ/4"
    assert {g["kind"]: g["pop_ops"] for g in out["graphs"]} == {"prefill": {"prefill": 2}, "decode": {"decode": 2}}


def test_bad_prompt_len():
    with pytest.raises(ValueError, match="prompt_len=1"):
        inspect(tiny_model("llama"), prompt_len=1)


def test_the_paper_comparison_is_one_line_with_a_pointer(llama):
    _, rep = llama
    lines = [line for line in str(rep).splitlines() if "paper" in line]
    assert len(lines) == 1, lines
    assert "+2.85%" in lines[0] and "+3.48%" in lines[0] and "docs/design.md" in lines[0]
