"""Graph-level tests of the FFN matcher: exact match counts, kinds and patterns per family (no Inductor)."""

import pytest
import torch
import torch.nn as nn

from passes.match_ffn import PATTERNS, match_ffns
from passes.graph import copy_graph_module
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

# family -> (site kind, pattern, activation)
DENSE_FAMILIES = {
    "llama": ("gated", "GatedLinear", "silu"),
    "qwen2": ("gated", "GatedLinear", "silu"),
    "qwen3": ("gated", "GatedLinear", "silu"),
    "mistral": ("gated", "GatedLinear", "silu"),
    "gemma": ("gated", "GatedLinear", "gelu_tanh"),
    "gemma3": ("gated", "GatedLinear", "gelu_tanh"),
    "phi3": ("fused_gated", "FusedGatedLinear", "silu"),
    "gpt2": ("plain", "PlainConv1D", "gelu_tanh (written out)"),
    "opt": ("plain", "PlainLinear", "relu"),
}


def _prompt(batch=2, length=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding puts the attention mask into the graphs
    return ids, mask


@pytest.fixture(scope="module", params=sorted(DENSE_FAMILIES))
def family_graphs(request):
    model = tiny_model(request.param)
    ids, mask = _prompt()
    return request.param, model, capture_graphs(model, ids, mask, max_new_tokens=2)


def test_every_ffn_layer_matches_once_per_graph(family_graphs):
    family, model, graphs = family_graphs
    kind, pattern, act = DENSE_FAMILIES[family]
    n_layers = model.config.num_hidden_layers
    assert len(graphs) >= 2, "expected a prefill and a decode graph"
    for cap in graphs:
        sites, skipped = match_ffns(cap.gm)
        assert len(sites) == n_layers, [s.path for s in sites]
        assert {s.kind for s in sites} == {kind}
        assert {s.pattern.name for s in sites} == {pattern}
        assert {s.activation for s in sites} == {act}
        assert skipped == []
        d_ff = {s.d_ff for s in sites}
        assert len(d_ff) == 1
    prefill, decode = graphs[0], graphs[1]
    assert not any(s.is_decode for s in match_ffns(prefill.gm)[0])
    assert all(s.is_decode for s in match_ffns(decode.gm)[0])


def test_sites_are_identified_by_the_down_parameter(family_graphs):
    family, model, graphs = family_graphs
    params = {id(p) for p in model.parameters()}
    pre = [s.param for s in match_ffns(graphs[0].gm)[0]]
    dec = [s.param for s in match_ffns(graphs[1].gm)[0]]
    assert all(id(p) in params for p in pre)
    assert [id(p) for p in pre] == [id(p) for p in dec]


def test_pattern_table_is_readable():
    names = [p.name for p in PATTERNS]
    assert len(names) == len(set(names))
    for p in PATTERNS:
        assert p.kind in {"plain", "gated", "fused_gated"}
        assert "->" in p.rewrite


class _FFN(nn.Module):
    def __init__(self, mid):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.mid = mid

    def forward(self, x):
        return x + self.down(self.mid(self.up(x)))


_KEEP = []  # Dynamo holds weak references to the modules it traced; keep them alive for the session


def _graph_of(module, x):
    seen = []
    _KEEP.append(module)

    def backend(gm, ex, **_):
        seen.append(copy_graph_module(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend)(x)
    torch._dynamo.reset()
    return seen[0]


def test_plain_linear_ffn_matches():
    gm = _graph_of(_FFN(lambda h: torch.nn.functional.gelu(h)), torch.randn(2, 3, 16))
    sites, skipped = match_ffns(gm)
    assert [s.pattern.name for s in sites] == ["PlainLinear"] and skipped == []


def test_unknown_op_in_the_activation_is_left_dense_with_a_reason():
    gm = _graph_of(_FFN(lambda h: torch.cumsum(torch.relu(h), dim=-1)), torch.randn(2, 3, 16))
    sites, skipped = match_ffns(gm)
    assert sites == []
    assert len(skipped) == 1 and "cumsum" in skipped[0].reason


def test_intermediate_used_outside_the_ffn_is_left_dense():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 24)
            self.down = nn.Linear(24, 16)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h), h.sum()

    gm = _graph_of(Leaky(), torch.randn(2, 3, 16))
    sites, skipped = match_ffns(gm)
    assert sites == [] and len(skipped) == 1 and "outside the FFN" in skipped[0].reason


def test_two_stacked_linears_without_activation_are_not_an_ffn():
    gm = _graph_of(_FFN(lambda h: h * 2.0), torch.randn(2, 3, 16))
    assert match_ffns(gm) == ([], [])
