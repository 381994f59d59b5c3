"""Regional compilation (``pop_fx/regional.py``): one compiled decoder layer serves every identical layer.

The backend splits Dynamo's whole-model graph at the layers, compiles each distinct layer graph once and calls it
for every layer with that layer's weights, cache and POP state. Checked: the split's blocks and their
signatures, how many graphs Inductor compiles, and that generate() equals the eager reference either way.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import pop_fx
from pop_fx import PopConfig
from pop_fx.reference import pruned
from pop_fx.regional import block_of, partition, signature
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

pytestmark = pytest.mark.compile

CFG = dict(sparsity=0.5, candidate_ratio=0.2)
PROMPT = torch.tensor([[5, 9, 33, 17, 40, 8, 77]])


def _generate(model, steps=4):
    with torch.no_grad():
        return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=steps, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _assert_same(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= atol


@pytest.fixture(scope="module")
def llama_graphs():
    model = tiny_model("llama", num_hidden_layers=4)
    return model, capture_graphs(model, PROMPT, torch.ones_like(PROMPT), max_new_tokens=2)


def test_the_graph_splits_into_one_block_per_layer_and_glue(llama_graphs):
    model, graphs = llama_graphs
    for g in graphs:
        ids = partition(g.gm)
        blocks = {}
        for n, pid in ids.items():
            blocks.setdefault(pid, set()).add(block_of(n))
        layer_blocks = [b for b in blocks.values() if b != {None}]
        assert len(layer_blocks) == 4 and all(len(b) == 1 for b in layer_blocks)
        # partitions follow graph order: a block's nodes are one run, never interleaved with another's
        order = [ids[n] for n in g.gm.graph.nodes if n in ids]
        assert order == sorted(order)


def _is_layer(m):
    return any(block_of(n) for n in m.graph.nodes if n.op not in ("placeholder", "output"))


def test_layers_have_one_signature_and_other_shapes_another(llama_graphs):
    from torch.fx.passes.split_module import split_module

    _, graphs = llama_graphs
    gm = graphs[0].gm
    ids = partition(gm)
    split = split_module(gm, None, lambda n: ids[n], keep_original_order=True)
    subs = [m for name, m in split.named_children() if name.startswith("submod")]
    layer_sigs = [signature(m) for m in subs if _is_layer(m)]
    assert len(layer_sigs) == 4
    assert len(set(layer_sigs[1:])) == 1  # layer 0 may differ: it computes size expressions the others reuse
    glue = [signature(m) for m in subs if not _is_layer(m)]
    assert not set(glue) & set(layer_sigs)


@pytest.mark.parametrize("regional", [True, False])
def test_generate_equals_the_reference_compiled_either_way(regional):
    torch._dynamo.reset()
    counters["pop"].clear()
    model = pop_fx.compile(tiny_model("llama", num_hidden_layers=6), **CFG, regional=regional)
    out = _generate(model)
    ref_model = tiny_model("llama", num_hidden_layers=6)
    with pruned(ref_model, PopConfig(**CFG)):
        ref = _generate(ref_model)
    _assert_same(out, ref)
    if regional:
        # 3 graphs (prefill, first decode, later decodes) of 6 layers: 18 layer blocks, at most 2 compiled per graph
        assert counters["pop"]["blocks"] == 3 * (6 + 2)
        assert counters["pop"]["blocks_compiled"] <= 3 * 4  # glue before and after, at most two layer graphs
    else:
        assert counters["pop"]["blocks"] == 0


def test_two_kinds_of_layers_compile_apart_and_stay_exact():
    # Gemma3 alternates sliding-window and full-attention layers: two layer graphs, each reused.
    torch._dynamo.reset()
    counters["pop"].clear()
    kw = dict(num_hidden_layers=4, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2)
    model = pop_fx.compile(tiny_model("gemma3", **kw), **CFG)
    out = _generate(model)
    ref_model = tiny_model("gemma3", **kw)
    with pruned(ref_model, PopConfig(**CFG)):
        ref = _generate(ref_model)
    _assert_same(out, ref)
    assert counters["pop"]["blocks"] >= 12


def test_sparsity_zero_regional_equals_stock_inductor():
    torch._dynamo.reset()
    stock = tiny_model("llama", num_hidden_layers=4)
    stock.compile(backend="inductor")
    want = _generate(stock)
    torch._dynamo.reset()
    got = _generate(pop_fx.compile(tiny_model("llama", num_hidden_layers=4), sparsity=0.0))
    _assert_same(got, want, atol=1e-5)
