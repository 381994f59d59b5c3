"""The benchmark's machinery (never its timings): variants, the sliced ideal, the result structure."""

import torch

from pop_fx import PopConfig
from pop_fx.bench import FFNStack, bench_ffn, sliced_copy
from pop_fx.models import tiny_model


def test_sliced_copy_keeps_the_first_n_keep_channels_exactly():
    model = tiny_model("llama")
    k = 40
    sliced = sliced_copy(model, lambda d_ff: k)
    mlp, cut = model.model.layers[0].mlp, sliced.model.layers[0].mlp
    assert cut.gate_proj.weight.shape[0] == cut.up_proj.weight.shape[0] == cut.down_proj.weight.shape[1] == k
    x = torch.randn(2, 3, 64)
    h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    h[..., k:] = 0
    torch.testing.assert_close(cut(x), mlp.down_proj(h), atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].mlp.gate_proj.weight.shape[0] == 128  # the original is untouched


def test_sliced_copy_fused_gate_up():
    model = tiny_model("phi3")
    sliced = sliced_copy(model, lambda d_ff: 50)
    assert sliced.model.layers[0].mlp.gate_up_proj.weight.shape[0] == 100
    out = sliced(torch.randint(3, 200, (1, 5))).logits
    assert torch.isfinite(out).all()


def test_bench_ffn_reports_every_variant():
    cfg = PopConfig(sparsity=0.5, lowering="eager")
    cells = bench_ffn(32, 64, 2, cfg, prompt=4, steps=2, rounds=2, variants=("dense-eager", "pop"))
    assert set(cells) == {"dense-eager", "pop"}
    assert all(len(c.times) == 2 and c.median > 0 for c in cells.values())
    assert cells["pop"].extra_bytes > 0 and cells["dense-eager"].extra_bytes == 0


def test_ffn_stack_is_residual():
    m = FFNStack(8, 16, 3)
    x = torch.randn(1, 2, 8)
    y = x
    for layer in m.layers:
        y = y + layer(y)
    torch.testing.assert_close(m(x), y)
