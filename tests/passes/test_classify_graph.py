"""classify_graph: a decode graph is one token per sequence on a KV cache; a one-token prompt's first forward
reads no cache and is a prefill; a graph with no attention (an FFN compiled alone) cannot tell, so one token
is a decode step."""

import torch
import torch.nn as nn

from passes.classify_graph import reads_kv_cache
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model


def test_prefill_reads_no_cache_and_decode_does(llama):
    _, caps = llama
    assert reads_kv_cache(caps[0].gm) is False
    assert reads_kv_cache(caps[1].gm) is True


def test_a_one_token_prompt_first_forward_reads_no_cache():
    model = tiny_model("llama")
    one = torch.tensor([[17]])
    caps = capture_graphs(model, one, torch.ones_like(one), max_new_tokens=2)
    assert [reads_kv_cache(c.gm) for c in caps[:2]] == [False, True]


def test_a_graph_without_attention_counts_as_cached():
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    torch.compile(ffn, backend=backend)(torch.randn(1, 1, 8))
    torch._dynamo.reset()
    assert reads_kv_cache(seen[0]) is True
