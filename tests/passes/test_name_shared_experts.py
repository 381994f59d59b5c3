"""name_shared_experts: a gated FFN beside routed experts (or named shared_expert) is kind shared_expert."""

import types

from passes.name_shared_experts import block_of, name_shared_experts


def _m(path, kind="gated"):
    return types.SimpleNamespace(path=path, kind=kind)


def test_block_of():
    assert block_of("model.layers.0.mlp.experts") == "model.layers.0.mlp"
    assert block_of("experts") == ""


def test_kinds_beside_and_away_from_routed_experts():
    sites = [_m("model.layers.0.mlp.shared_expert"), _m("model.layers.1.mlp.gate_ffn"), _m("model.layers.2.mlp"),
             _m("model.layers.1.mlp.plain_ffn", kind="plain")]
    experts = [types.SimpleNamespace(path="model.layers.1.mlp.experts")]
    assert name_shared_experts(sites, experts) == ["shared_expert", "shared_expert", "gated", "plain"]
    assert name_shared_experts(sites[2:3], []) == ["gated"]
