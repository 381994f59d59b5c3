"""pop_fx.tools.budget against the paper's Table 8 and by hand-counted shapes."""

import pytest
import sympy
from transformers import GPT2Config, LlamaConfig, MixtralConfig

from pop_fx.tools.budget import SYMBOLS, decoder_parameter_counts, ffn_sparsity_for_model, ffn_sparsity_for_total, sparsity_expression

LLAMA2_7B = dict(d_model=4096, d_ff=11008, n_layers=32, n_heads=32)


@pytest.mark.parametrize("total, ffn", [(0.20, 0.299), (0.40, 0.598)])
def test_table8_llama2_7b(total, ffn):
    # Table 8 prints one decimal of a percentage: 29.9 and 59.8.
    assert ffn_sparsity_for_total(total, **LLAMA2_7B) * 100 == pytest.approx(ffn * 100, abs=0.05)
    assert ffn_sparsity_for_model(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32), total) * 100 == pytest.approx(ffn * 100, abs=0.05)


def test_counts_by_hand_llama2_7b():
    c = decoder_parameter_counts(**LLAMA2_7B)
    assert c["attention"] == 32 * 4 * 4096 * 4096
    assert c["ffn"] == c["ffn_channel"] == 32 * 3 * 4096 * 11008
    assert c["norms"] == 32 * 2 * 4096
    assert c["total"] == c["attention"] + c["ffn"] + c["norms"]
    # r = t * total / ffn_channel, exactly.
    assert ffn_sparsity_for_total(0.25, **LLAMA2_7B) == pytest.approx(0.25 * c["total"] / c["ffn_channel"], rel=1e-12)


def test_gqa_shrinks_attention_and_lowers_r():
    # SmolLM2-135M: 9 query heads of 64, 3 kv heads; k and v are 576 x 192.
    gqa = decoder_parameter_counts(d_model=576, d_ff=1536, n_layers=30, n_heads=9, n_kv_heads=3)
    assert gqa["attention"] == 30 * (2 * 576 * 576 + 2 * 576 * 192)
    mha = ffn_sparsity_for_total(0.3, d_model=576, d_ff=1536, n_layers=30, n_heads=9)
    assert ffn_sparsity_for_total(0.3, d_model=576, d_ff=1536, n_layers=30, n_heads=9, n_kv_heads=3) < mha


def test_plain_ffn_with_biases_gpt2():
    cfg = GPT2Config()  # 768, 12 layers, n_inner None -> 3072
    c = decoder_parameter_counts(d_model=768, d_ff=3072, n_layers=12, n_heads=12, gated=False, qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True)
    # GPT-2 small's 12 blocks hold 85,054,464 parameters (124,439,808 minus wte, wpe and ln_f).
    assert c["total"] == 124_439_808 - 50257 * 768 - 1024 * 768 - 2 * 768
    assert ffn_sparsity_for_model(cfg, 0.2) == pytest.approx(0.2 * c["total"] / c["ffn_channel"], rel=1e-12)


def test_expression_is_symbolic_and_linear_in_t():
    expr = sparsity_expression()
    t = SYMBOLS["t"]
    assert expr.free_symbols >= {t, SYMBOLS["d_ff"], SYMBOLS["d_model"], SYMBOLS["n_kv_heads"]}
    assert SYMBOLS["n_layers"] not in expr.free_symbols  # every layer has the same shape
    assert sympy.simplify(sympy.diff(expr, t, 2)) == 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(total_reduction=0.7), "total_reduction"),  # needs r > 1 for Llama2-7B (max ~0.668)
        (dict(total_reduction=-0.1), "total_reduction"),
        (dict(total_reduction=float("nan")), "total_reduction"),
        (dict(total_reduction="0.2"), "total_reduction"),
        (dict(total_reduction=0.2, d_ff=0), "d_ff"),
        (dict(total_reduction=0.2, n_heads=5), "n_heads"),
        (dict(total_reduction=0.2, n_kv_heads=3), "n_kv_heads"),
        (dict(total_reduction=0.2, n_layers=2.5), "n_layers"),
        (dict(total_reduction=0.2, gated="yes"), "gated"),
    ],
)
def test_bad_input_names_parameter_and_range(kwargs, needle):
    args = {**LLAMA2_7B, **kwargs}
    total = args.pop("total_reduction")
    with pytest.raises(ValueError, match=needle) as e:
        ffn_sparsity_for_total(total, **args)
    assert "allowed" in str(e.value)


def test_limit_is_stated_for_impossible_budget():
    with pytest.raises(ValueError, match=r"< 0\.668"):
        ffn_sparsity_for_total(0.7, **LLAMA2_7B)


def test_moe_config_is_refused():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ffn_sparsity_for_model(MixtralConfig(), 0.2)
