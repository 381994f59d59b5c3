"""The pass pipeline (passes/pipeline.py): its order, its counts, what it leaves alone, and what a rewritten graph
carries for the backend (a Slot per site, the report's notes), per family (no Inductor)."""

import logging

import pytest
from torch._dynamo.utils import counters

from passes.nodes import param_of
from passes.pipeline import PASSES, run_passes
from pop_fx import PopConfig
from pop_fx.state import STATE_NAMES

from _graphs import ffn_params

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def test_the_passes_run_in_order_and_are_counted(graphs):
    model, caps = graphs
    rw = run_passes(caps[0].gm, CFG)
    assert [name for name, _ in rw.passes] == [p.name for p in PASSES] == [
        "classify_graph", "match_ffn", "match_vision", "match_experts", "name_shared_experts", "decide", "rewrite_prefill",
        "rewrite_decode", "rewrite_proxy", "rewrite_experts"]
    n = len(ffn_params(model)[1])
    assert dict(rw.passes) == {"classify_graph": 0, "match_ffn": n, "match_vision": 0, "match_experts": 0,
                               "name_shared_experts": 0, "decide": n, "rewrite_prefill": n, "rewrite_decode": 0,
                               "rewrite_proxy": 0, "rewrite_experts": 0}
    decode = dict(run_passes(caps[1].gm, CFG).passes)
    assert decode["rewrite_decode"] == n and decode["rewrite_prefill"] == 0


def test_counts_reach_dynamos_counters_and_the_log(llama, caplog):
    _, caps = llama
    counters["pop"].clear()
    with caplog.at_level(logging.DEBUG, logger="pop_fx.passes"):
        run_passes(caps[0].gm, CFG)
        run_passes(caps[1].gm, CFG)
    assert counters["pop"]["rewrite_prefill"] == 2 and counters["pop"]["rewrite_decode"] == 2
    assert counters["pop"]["prefill_graphs"] == 1 and counters["pop"]["decode_graphs"] == 1
    assert any("rewrite_decode: 2" in r.getMessage() for r in caplog.records)


def test_a_rewritten_graph_holds_a_slot_per_site_not_state(llama):
    # The backend finds each call's state from the inputs a slot names: they must be the site's weights.
    model, caps = llama
    rw = run_passes(caps[1].gm, CFG)
    inputs = [n for n in rw.gm.graph.nodes if n.op == "placeholder"]
    downs = {id(p) for p in ffn_params(model)[1]}
    assert len(rw.slots) == 2
    for slot in rw.slots:
        w = dict(slot.weights)
        assert id(param_of(inputs[w["wd"]])) in downs and slot.names == STATE_NAMES and slot.phase == "decode"
    state_inputs = [n for n in inputs if "pop_state" in n.meta]
    assert len(state_inputs) == len(rw.state_tensors) == 2 * len(STATE_NAMES)
    assert {(n.reason, n.graph) for n in rw.notes} == {("pop", "decode")}


def test_the_rewrite_leaves_dynamos_graph_untouched(graphs):
    _, caps = graphs
    before = caps[1].gm.code
    run_passes(caps[1].gm, CFG)
    assert caps[1].gm.code == before


def test_a_config_the_compiled_path_cannot_serve_is_refused(llama):
    _, caps = llama
    with pytest.raises(ValueError, match="scope='sequence'"):
        run_passes(caps[1].gm, PopConfig(candidate_proxy="int8", scope="sequence"))


def test_uuid_changes_with_config():
    from pop_fx.backend import passes_uuid

    assert passes_uuid(PopConfig(sparsity=0.5)) != passes_uuid(PopConfig(sparsity=0.4))
    assert passes_uuid(PopConfig(sparsity=0.5)) == passes_uuid(PopConfig(sparsity=0.5))
