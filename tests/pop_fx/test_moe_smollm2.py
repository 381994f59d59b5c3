"""Real weights in an MoE: SmolLM2 with each FFN split into 4 experts that a router activates all at once.

The compiled path on MoEs is tested against the reference on tiny models (test_moe.py); compiling the
30-layer model here would cost minutes, so these tests use the eager reference.
"""

import pytest
import torch

from pop_fx import PopConfig
from pop_fx.tools.agreement import decode_logits, next_token_agreement
from pop_fx.reference import pruned

pytestmark = pytest.mark.real_model

TEXT = "In the beginning, God created the heavens and the earth. The earth was formless and empty. Darkness was on"


@pytest.fixture(scope="module")
def smollm2_moe(smollm2):
    from pop_fx.tools.models import split_into_experts

    dense, tok = smollm2
    return dense, split_into_experts(dense, 4), tok


def test_split_model_equals_dense_and_pop_agreement(smollm2_moe):
    dense, moe, tok = smollm2_moe
    experts = moe.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 2 * 384, 576) and moe.config.num_experts_per_tok == 4
    ids = tok(TEXT, return_tensors="pt").input_ids
    dense_logits = decode_logits(dense, ids, 8)
    dense_argmax = dense_logits.argmax(-1)
    # r = 0: no expert is hooked and the split model is the dense model (only the order of additions differs).
    with pruned(moe, PopConfig(sparsity=0.0)) as policy:
        got = decode_logits(moe, ids, 8)
    assert policy.states == {}
    assert torch.equal(got.argmax(-1), dense_argmax)
    assert (got - dense_logits).abs().max().item() < 1e-3
    # r = 0.5: per-expert POP next to the dense-FFN POP (figures for the closing note).
    cfg = PopConfig(sparsity=0.5)
    moe_pop = next_token_agreement(moe, ids, 8, lambda: pruned(moe, cfg), dense_argmax)
    ffn_pop = next_token_agreement(dense, ids, 8, lambda: pruned(dense, cfg), dense_argmax)
    print(f"next-token agreement at r=0.5: dense-FFN POP {ffn_pop:.3f}, per-expert POP {moe_pop:.3f}")
    # Both prune half of every FFN's channels: they disagree with dense somewhere, and keep much of it.
    assert 0.2 < moe_pop < 1.0 and 0.2 < ffn_pop < 1.0


def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "moe_smollm2.py"
    spec = importlib.util.spec_from_file_location("moe_smollm2_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_perplexity_is_exp_of_the_continuation_nll():
    mod = _example()
    V, prompt_len = 7, 3
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    # Uniform logits: every continuation token has probability 1/V, so the perplexity is V.
    uniform = torch.zeros(1, ids.shape[1] - prompt_len + 1, V)
    assert mod.perplexity(uniform, ids, prompt_len) == pytest.approx(V, rel=1e-6)
    # Certain of every continuation token (position i predicts ids[prompt_len + i]); the last position is ignored.
    sure = torch.full_like(uniform, -1e4)
    for i, t in enumerate(ids[0, prompt_len:].tolist()):
        sure[0, i, t] = 0.0
    sure[0, -1, 0] = 0.0
    assert mod.perplexity(sure, ids, prompt_len) == pytest.approx(1.0, abs=1e-6)
