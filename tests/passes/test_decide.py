"""decide: per matched site, dense sites and routed-experts modules alike, the action and the report's reason."""

import pytest

from passes.decide import decide
from passes.match_experts import match_experts
from passes.match_ffn import match_ffns
from pop_fx import PopConfig

from _graphs import capture


def _site(caps, graph):
    return match_ffns(caps[graph].gm)[0][0]


@pytest.mark.parametrize("cfg,graph,action,reason", [
    (dict(sparsity=0.0), 1, "dense", "dense: every channel kept (sparsity 0)"),
    (dict(sparsity=0.5), 0, "prefill", "pop"),
    (dict(sparsity=0.5), 1, "decode", "pop"),
    (dict(sparsity=0.5, candidate_proxy="int8"), 1, "proxy", "pop"),
    (dict(sparsity=0.5, candidate_proxy="int8"), 0, "prefill", "pop"),
])
def test_gated_site_actions(llama, cfg, graph, action, reason):
    _, caps = llama
    d = decide(_site(caps, graph), "gated", PopConfig(**cfg))
    assert (d.action, d.reason) == (action, reason)
    assert (d.proxy is not None) == (action == "proxy")


def test_a_site_too_small_for_the_sparsity_stays_dense(llama):
    _, caps = llama
    m = _site(caps, 1)
    m.d_ff = 1  # what a 1-channel FFN would be: n_keep = round(0.4 · 1) = 0
    d = decide(m, "gated", PopConfig(sparsity=0.6))
    assert d.action == "dense" and "n_keep < 1" in d.reason


def test_a_site_the_proxy_cannot_serve_is_decoded_exactly_with_the_reason():
    _, caps = capture("gpt2")
    d = decide(_site(caps, 1), "plain", PopConfig(candidate_proxy="int8"))
    assert d.action == "decode" and "candidates scored exactly" in d.reason


def test_experts_modules_go_through_the_same_decision():
    _, caps = capture("mixtral")
    for graph, action in ((0, "experts_prefill"), (1, "experts_decode")):
        m = match_experts(caps[graph].gm)[0][0]
        assert decide(m, "expert", PopConfig()).action == action
        assert decide(m, "expert", PopConfig(sparsity=0.0)).action == "dense"
