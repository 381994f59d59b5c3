"""The benchmark's machinery (never its timings): variants, the sliced ideal, the result structure."""

import pytest
import torch

from pop_fx import PopConfig
from pop_fx.tools.bench import FFNStack, bench_ffn, bench_generate, sliced_copy
from pop_fx.tools.models import tiny_model


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


def test_bench_generate_times_decode_steps_only():
    model = tiny_model("llama")
    cfg = PopConfig(sparsity=0.5, lowering="eager")
    cells = bench_generate(model, None, cfg, new_tokens=4, rounds=2, variants=("dense-eager", "pop"))
    assert set(cells) == {"dense-eager", "pop"}
    for c in cells.values():
        assert len(c.times) == 2 and all(t > 0 for t in c.times) and c.prefill_s > 0


def test_run_cell_raises_the_recompile_limit_per_variant_and_refuses_a_run_that_hit_it(monkeypatch):
    import argparse

    from pop_fx import api

    from pop_fx.tools import bench

    seen = []
    monkeypatch.setattr(bench, "_measure_cell", lambda *a: seen.append(torch._dynamo.config.recompile_limit) or {})
    default = torch._dynamo.config.recompile_limit
    bench._run_cell(argparse.Namespace(), PopConfig(), 1, torch.float32, ("dense-inductor", "sliced", "pop"))
    assert seen == [3 * default] and torch._dynamo.config.recompile_limit == default
    hits = iter([0, 1])
    monkeypatch.setattr(api, "recompile_limit_hits", lambda: next(hits))
    with pytest.raises(RuntimeError, match="recompile limit was hit"):
        bench._run_cell(argparse.Namespace(), PopConfig(), 1, torch.float32, ("pop",))
