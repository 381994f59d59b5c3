"""Inductor's caches key on pop-fx's source: a graph compiled by one version is never served to another.

The ``pop::`` decode ops are decomposed into Inductor's graph from Python that Inductor's FX-graph and
AOT caches do not hash (a stale entry once served an old op body for a new one); the backend puts the
hash of its source into Inductor's config through ``CacheKeyPass``.
"""

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import pop_fx  # noqa: F401  (registers backend='pop')
from pop_fx import backend


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(16, 64, bias=False)
        self.up_proj = nn.Linear(16, 64, bias=False)
        self.down_proj = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _compile_once(model, x):
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="pop", options={"sparsity": 0.5})(x)
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def test_cache_hit_for_same_source_and_miss_when_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, x = FFN().eval(), torch.randn(1, 4, 16)
    assert _compile_once(model, x) == (0, 1)
    assert _compile_once(model, x) == (1, 0)  # same source, same config: served from the cache
    monkeypatch.setattr(backend, "_source_hash", lambda: "another pop-fx version")
    assert _compile_once(model, x) == (0, 1)  # the new source hash is a new key


def test_cache_key_pass_keeps_a_users_pass():
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "user"

    key = backend.CacheKeyPass("pop", UserPass())
    key(torch.fx.Graph())
    assert len(seen) == 1 and key.uuid() == ("pop", "user")
    assert backend.CacheKeyPass("pop").uuid() == ("pop", None)
