"""Vision-language models: the language model's FFNs are POP sites, the vision tower is left dense.

Tiny random Qwen2-VL / Qwen2.5-VL fed one 4x4-patch image per sequence plus text, with the
tensors their processors produce (``pop_fx.tools.models.vlm_inputs``).
"""

import pytest
import torch

import pop_fx
from passes.graph import pop_ops_in
from pop_fx import PopConfig
from passes.pipeline import run_passes
from pop_fx.tools.models import TINY_VLM_FAMILIES, tiny_vlm, vlm_inputs
from pop_fx.reference import pruned
from pop_fx.sites import VISION_REASON

pytestmark = pytest.mark.compile

CFG = dict(sparsity=0.5, candidate_ratio=0.2)
N_LAYERS, N_VISION_BLOCKS = 2, 2


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.fixture(scope="module", params=TINY_VLM_FAMILIES)
def vlm(request):
    torch._dynamo.reset()
    name = request.param
    inputs = vlm_inputs(tiny_vlm(name))
    ref_model = tiny_vlm(name)
    with pruned(ref_model, PopConfig(**CFG)):
        ref = _generate(ref_model, inputs)
    model = pop_fx.compile(tiny_vlm(name), **CFG, lowering="eager")
    return name, model, inputs, ref, _generate(model, inputs)


def test_compiled_generate_equals_reference(vlm):
    name, model, inputs, ref, out = vlm
    assert torch.equal(out.sequences, ref.sequences)
    assert _max_diff(out, ref) < 1e-4
    assert _max_diff(out, _generate(tiny_vlm(name), inputs)) > 1e-3  # and POP really pruned


def test_report_language_sites_and_dense_vision_tower(vlm):
    name, model, *_ = vlm
    rep = pop_fx.report(model)
    assert rep.counts() == {"gated": N_LAYERS, "dense": N_VISION_BLOCKS}
    assert [s["path"] for s in rep.sites] == [f"model.language_model.layers.{i}.mlp" for i in range(N_LAYERS)]
    assert all(s["graphs"] == ["decode", "prefill"] for s in rep.sites)
    assert [(d["path"], d["reason"]) for d in rep.dense] == [
        (f"model.visual.blocks.{i}.mlp", VISION_REASON) for i in range(N_VISION_BLOCKS)]


def test_vision_tower_traced_by_a_compiled_forward_stays_dense():
    """A plain compiled forward with pixel_values traces the vision tower (one graph per block, split by
    graph breaks): its MLPs are recognised as FFN-like but never rewritten; only the language model is."""
    torch._dynamo.reset()
    model = tiny_vlm("qwen2_5_vl")
    graphs = []

    def capture(gm, example_inputs, **_):
        graphs.append(run_passes(gm, PopConfig(**CFG, lowering="eager")))
        return gm.forward

    model.compile(backend=capture)
    with torch.no_grad():
        model(**vlm_inputs(model))
    torch._dynamo.reset()
    rewritten = [m.path for rw in graphs for m in rw.sites if pop_ops_in(rw.gm)]
    assert rewritten == [f"language_model.layers.{i}.mlp" for i in range(N_LAYERS)]  # paths relative to the frame
    assert sum(pop_ops_in(rw.gm).get("prefill", 0) for rw in graphs) == N_LAYERS
    # The vision blocks' MLP (one graph: Dynamo reuses it for every block) reached the matcher and was left dense.
    vision_skips = [(rw, s) for rw in graphs for s in rw.skipped if s.path.endswith("down_proj")]
    assert vision_skips and all(pop_ops_in(rw.gm) == {} for rw, _ in vision_skips)


def test_sparsity_zero_equals_dense():
    torch._dynamo.reset()
    inputs = vlm_inputs(tiny_vlm("qwen2_vl"))
    dense = _generate(tiny_vlm("qwen2_vl"), inputs)
    got = _generate(pop_fx.compile(tiny_vlm("qwen2_vl"), **{**CFG, "sparsity": 0.0}, lowering="eager"), inputs)
    assert torch.equal(got.sequences, dense.sequences)
    assert _max_diff(got, dense) < 1e-5
