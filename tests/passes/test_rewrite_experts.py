"""rewrite_experts: a routed-experts region becomes one pop::experts_prefill / pop::experts_decode (no Inductor)."""

import pytest

from passes.graph import pop_ops_in
from passes.pipeline import run_passes
from pop_fx import PopConfig
from pop_fx.state import EXPERT_STATE_NAMES

from _graphs import capture


@pytest.fixture(scope="module")
def mixtral():
    model, caps = capture("mixtral")
    return model, caps


def test_each_experts_region_becomes_one_op(mixtral):
    model, caps = mixtral
    n = model.config.num_hidden_layers
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")
    pre, dec = run_passes(caps[0].gm, cfg), run_passes(caps[1].gm, cfg)
    assert pop_ops_in(pre.gm) == {"experts_prefill": n} and pop_ops_in(dec.gm) == {"experts_decode": n}
    assert pre.counts["experts_prefill"] == n and dec.counts["experts_decode"] == n
    for rw, phase in ((pre, "prefill"), (dec, "decode")):
        assert [s.phase for s in rw.slots] == [phase] * n
        assert all(s.spec is None and s.names == EXPERT_STATE_NAMES for s in rw.slots)
        assert {dict(s.weights).keys() == {"gate_up", "down"} for s in rw.slots} == {True}


def test_experts_too_small_to_prune_stay_dense_with_the_reason(mixtral):
    _, caps = mixtral
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.0, lowering="eager"))
    assert pop_ops_in(rw.gm) == {} and rw.slots == []
    assert {n.reason for n in rw.notes if n.kind == "expert"} == {"dense: every channel kept (sparsity 0)"}
