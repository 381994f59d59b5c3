"""Graph-level tests of the experts matcher and rewrite: regions, counts, ops before/after (no Inductor)."""

import types

import pytest
import torch

from passes.match_experts import match_experts
from passes.name_shared_experts import name_shared_experts
from passes.match_ffn import match_ffns
from passes.graph import pop_ops_in
from pop_fx import PopConfig
from passes.graph import copy_graph_module
from passes.pipeline import run_passes
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def _graphs(model):
    torch._dynamo.reset()
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    caps = capture_graphs(model, ids, mask, max_new_tokens=2)
    return caps[0].gm, caps[1].gm  # prefill, decode


def _targets(gm):
    return {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture(scope="module", params=["grouped_mm", "batched_mm"])
def qwen2_moe(request):
    model = tiny_model("qwen2_moe")
    model.set_experts_implementation(request.param)
    return request.param, model, _graphs(model)


def test_one_region_per_layer_with_its_interface(qwen2_moe):
    impl, model, (prefill, decode) = qwen2_moe
    for gm, is_decode in ((prefill, False), (decode, True)):
        matches, skipped = match_experts(copy_graph_module(gm))
        assert skipped == []
        assert [m.path for m in matches] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
        for i, m in enumerate(matches):
            experts = model.model.layers[i].mlp.experts
            assert m.param is experts.down_proj and m.gate_up_param is experts.gate_up_proj
            assert (m.num_experts, m.d_ff, m.d_model, m.top_k) == (4, 48, 64, 2)
            assert (m.implementation, m.activation, m.is_decode) == (impl, "silu", is_decode)
            assert m.top_k_index.meta["example_value"].dtype == torch.int64


def test_shared_expert_kind_from_the_routed_experts_beside_it(qwen2_moe):
    _, _, (prefill, _) = qwen2_moe
    gm = copy_graph_module(prefill)
    sites, _ = match_ffns(gm)
    matches, _ = match_experts(gm)
    assert [m.kind for m in sites] == ["gated", "gated"]  # the dense pattern
    assert name_shared_experts(sites, matches) == ["shared_expert", "shared_expert"]
    assert name_shared_experts(sites, []) == ["shared_expert", "shared_expert"]  # its path names it, too


def test_rewrite_replaces_the_whole_region(qwen2_moe):
    impl, _, (prefill, decode) = qwen2_moe
    inner = "grouped_mm_fallback" if impl == "grouped_mm" else "bmm"
    assert any(inner in t for t in _targets(prefill))
    rw = run_passes(prefill, CFG)
    assert pop_ops_in(rw.gm) == {"prefill": 2, "experts_prefill": 2}
    assert not any(inner in t for t in _targets(rw.gm))
    assert rw.counts["experts_prefill"] == 2 and rw.counts["experts_decode"] == 0
    rw = run_passes(decode, CFG)
    assert pop_ops_in(rw.gm) == {"decode": 2, "experts_decode": 2}
    assert not any(inner in t for t in _targets(rw.gm))
    # the router stays: its softmax/top-k feed the op
    assert "topk" in _targets(rw.gm)


def test_sparsity_zero_rewrites_nothing(qwen2_moe):
    _, _, (prefill, _) = qwen2_moe
    rw = run_passes(prefill, CFG.replace(sparsity=0.0))
    assert pop_ops_in(rw.gm) == {} and rw.state_tensors == []


def test_custom_gate_leaves_the_block_dense_with_the_op_named():
    """A clamped gate (GPT-OSS style) is not act(gate)·up: the region is left as it is, never approximated."""
    model = tiny_model("mixtral")
    model.set_experts_implementation("batched_mm")
    for layer in model.model.layers:
        def gate(self, gate_up):
            g, u = gate_up.chunk(2, dim=-1)
            return self.act_fn(g.clamp(max=7.0)) * u
        layer.mlp.experts._apply_gate = types.MethodType(gate, layer.mlp.experts)
    prefill, _ = _graphs(model)
    matches, skipped = match_experts(copy_graph_module(prefill))
    assert matches == []
    assert len(skipped) == 2 and all("clamp" in s.reason for s in skipped)
    rw = run_passes(prefill, CFG)
    assert pop_ops_in(rw.gm) == {}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_dynamic_shapes_share_a_size_expression_across_regions_and_every_region_is_rewritten(family):
    # After a recompile on a new prompt length (or a second model of the class: Dynamo's automatic dynamic
    # shapes), the token count is symbolic and Dynamo computes T·k once in layer 0's experts region and
    # reuses it in layer 1's. That shared size is not a second result: both regions must still match.
    model = tiny_model(family)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(1))
    caps = capture_graphs(model, ids, torch.ones_like(ids), max_new_tokens=2, dynamic=True)
    prefill = caps[0].gm
    matches, skipped = match_experts(copy_graph_module(prefill))
    assert skipped == [] and len(matches) == 2
    rw = run_passes(prefill, CFG)
    assert pop_ops_in(rw.gm)["experts_prefill"] == 2
