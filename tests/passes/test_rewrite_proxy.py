"""rewrite_proxy: under candidate_proxy, a gated decode site becomes pop::proxy_select + gather_in + decode_sel
("int8-values": one pop::values_decode); a site the proxy cannot serve keeps pop::decode, with the reason."""

import pytest

from passes.graph import pop_ops_in
from passes.pipeline import run_passes
from pop_fx import PopConfig

from _graphs import capture, ffn_params, linears_reading


def test_proxy_ops_replace_the_decode_ops(llama):
    model, caps = llama
    rw = run_passes(caps[1].gm, PopConfig(candidate_proxy="int8", candidate_ratio=0.4, lowering="eager"))
    assert pop_ops_in(rw.gm) == {"proxy_select": 2, "gather_in": 2, "decode_sel": 2}
    assert {(n.reason, n.graph) for n in rw.notes} == {("pop", "decode")}


def test_int8_values_replaces_the_whole_ffn(llama):
    model, caps = llama
    ups, downs = ffn_params(model)
    rw = run_passes(caps[1].gm, PopConfig(candidate_proxy="int8-values", candidate_ratio=2, lowering="eager"))
    assert pop_ops_in(rw.gm) == {"values_decode": 2}
    assert linears_reading(rw.gm, ups) == 0
    # no R ∪ C layouts: the op reads the original down weight and the int8 copy
    assert all(slot.spec.layouts is False and slot.names[-3:] == ("q", "s", "wd_t") for slot in rw.slots)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_a_site_the_proxy_cannot_serve_keeps_exact_scoring_and_says_why(family):
    _, caps = capture(family)
    rw = run_passes(caps[1].gm, PopConfig(candidate_proxy="int8", lowering="eager"))
    assert set(pop_ops_in(rw.gm)) == {"decode"}
    assert all("candidates scored exactly" in n.reason for n in rw.notes)
