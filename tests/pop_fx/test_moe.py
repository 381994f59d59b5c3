"""Mixture-of-experts under the compiled backend: shared experts and routed experts."""

import pytest
import torch

import pop_fx
from pop_fx.models import tiny_model

pytestmark = pytest.mark.compile

NEW_TOKENS = 5
CFG = dict(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def _prompt(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, model.config.vocab_size - 1, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)


def test_qwen2_moe_shared_experts_are_sites_of_their_own_kind():
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model("qwen2_moe"), **CFG)
    _generate(model, *_prompt(model))
    rep = pop_fx.report(model)
    n = model.config.num_hidden_layers
    assert rep.counts() == {"shared_expert": n, "dense": n}
    assert [s["path"] for s in rep.sites] == [f"model.layers.{i}.mlp.shared_expert" for i in range(n)]
    assert all(s["graphs"] == ["decode", "prefill"] for s in rep.sites)
    assert all("routed experts" in d["reason"] for d in rep.dense)


def test_qwen2_moe_sparsity_zero_equals_dense():
    torch._dynamo.reset()
    ids, mask = _prompt(tiny_model("qwen2_moe"))
    dense = _generate(tiny_model("qwen2_moe"), ids, mask)
    got = _generate(pop_fx.compile(tiny_model("qwen2_moe"), **{**CFG, "sparsity": 0.0}), ids, mask)
    assert torch.equal(got.sequences, dense.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, dense.logits)) < 1e-5
