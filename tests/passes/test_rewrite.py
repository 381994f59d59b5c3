"""Graph-level tests of the rewrite: which ops exist before and after, per family (no Inductor)."""

import pytest
import torch

from passes.graph import pop_ops_in
from pop_fx import PopConfig
from passes.pipeline import run_passes
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

FAMILIES = ["llama", "phi3", "gpt2", "opt"]


def _linears_reading(gm, params):
    """Projection nodes (linear/addmm) whose weight placeholder is one of ``params``."""
    from passes.nodes import addmm_parts, linear_parts, param_of

    ids = {id(p) for p in params}
    out = 0
    for n in gm.graph.nodes:
        parts = linear_parts(n) if n.op == "call_function" else None
        parts = parts or (addmm_parts(n) if n.op == "call_function" else None)
        if parts and param_of(parts[1]) is not None and id(param_of(parts[1])) in ids:
            out += 1
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def graphs(request):
    model = tiny_model(request.param)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    return model, capture_graphs(model, ids, torch.ones_like(ids), max_new_tokens=2)


def _ffn_params(model):
    from pop_fx.sites import find_module_sites

    sites, _ = find_module_sites(model)
    ups, downs = [], []
    for s in sites:
        downs.append(s.down.weight)
        for name, p in s.module.named_parameters():
            # gate/up weights: d_ff (or 2·d_ff fused) output channels; Conv1D stores them [in, out]
            is_up = p.shape[0] in (s.d_ff, 2 * s.d_ff) or (type(s.down).__name__ == "Conv1D" and p.shape[-1] == s.d_ff)
            if p.dim() == 2 and p is not s.down.weight and "weight" in name and is_up:
                ups.append(p)
    return ups, downs


def test_prefill_graph_ops_before_and_after(graphs):
    model, caps = graphs
    n = model.config.num_hidden_layers
    ups, downs = _ffn_params(model)
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")
    before = caps[0].gm
    rw = run_passes(before, cfg)
    assert rw.counts == {"matched": n, "skipped": 0, "prefill": n, "decode": 0}
    assert pop_ops_in(before) == {}
    assert pop_ops_in(rw.gm) == {"prefill": n}
    # The prefill keeps its dense gate/up; the down projections are now inside pop::prefill.
    assert _linears_reading(before, downs) == n and _linears_reading(rw.gm, downs) == 0
    assert _linears_reading(rw.gm, ups) == _linears_reading(before, ups) > 0
    assert len(rw.state_tensors) == 6 * n


def test_decode_graph_ops_before_and_after(graphs):
    model, caps = graphs
    n = model.config.num_hidden_layers
    ups, downs = _ffn_params(model)
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager"))
    assert rw.counts["decode"] == n and rw.counts["prefill"] == 0
    assert pop_ops_in(rw.gm) == {"decode": n}
    # Neither the original gate/up nor the down weights are read while decoding: only the R∪C layouts.
    assert _linears_reading(rw.gm, ups + downs) == 0
    assert _linears_reading(caps[1].gm, ups + downs) > 0


def test_sequence_scope_decode_uses_per_sequence_ops(graphs):
    model, caps = graphs
    n = model.config.num_hidden_layers
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.5, scope="sequence", lowering="eager"))
    assert pop_ops_in(rw.gm) == {"decode_seq": n}


def test_sparsity_zero_rewrites_nothing(graphs):
    model, caps = graphs
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.0, lowering="eager"))
    assert rw.counts["matched"] == model.config.num_hidden_layers
    assert rw.counts["decode"] == 0 and rw.state_tensors == [] and pop_ops_in(rw.gm) == {}


def test_rewrite_leaves_dynamos_graph_untouched(graphs):
    _, caps = graphs
    before = caps[1].gm.code
    run_passes(caps[1].gm, PopConfig(lowering="eager"))
    assert caps[1].gm.code == before


def test_uuid_changes_with_config():
    from pop_fx.backend import passes_uuid

    assert passes_uuid(PopConfig(sparsity=0.5)) != passes_uuid(PopConfig(sparsity=0.4))
    assert passes_uuid(PopConfig(sparsity=0.5)) == passes_uuid(PopConfig(sparsity=0.5))


def test_pipeline_runs_its_passes_in_order_and_counts_them(graphs):
    from passes.pipeline import PASSES

    model, caps = graphs
    rw = run_passes(caps[0].gm, PopConfig(sparsity=0.5, lowering="eager"))
    assert [name for name, _ in rw.passes] == [p.name for p in PASSES] == [
        "classify_graph", "match_ffn", "match_vision", "match_experts", "name_shared_experts", "decide", "rewrite_prefill",
        "rewrite_decode", "rewrite_proxy", "rewrite_experts"]
    n = len(_ffn_params(model)[1])
    assert dict(rw.passes) == {"classify_graph": 0, "match_ffn": n, "match_vision": 0, "match_experts": 0, "name_shared_experts": 0,
                               "decide": n, "rewrite_prefill": n, "rewrite_decode": 0, "rewrite_proxy": 0,
                               "rewrite_experts": 0}
    decode = dict(run_passes(caps[1].gm, PopConfig(sparsity=0.5, lowering="eager")).passes)
    assert decode["rewrite_decode"] == n and decode["rewrite_prefill"] == 0
