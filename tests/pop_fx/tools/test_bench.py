"""The benchmark's machinery (never its timings): variants, the sliced ideal, the result structure."""

import pytest
import torch

from pop_fx import PopConfig
from pop_fx.tools import bench as B
from pop_fx.tools.bench import FFNStack, bench_ffn, bench_generate, fused_copy, sliced_copy
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


class _FakeClockModel:
    """generate() that takes 1.0 s of a fake clock to prefill and 0.1 s per further token, calling the logits
    processors as transformers does: the bench must report 10 tokens/s and a 1.0 s prefill, exactly."""

    def __init__(self, clock):
        self.clock = clock
        self.config = type("C", (), {"vocab_size": 50})()

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate(self, input_ids, max_new_tokens, logits_processor, **kw):
        for i in range(max_new_tokens):
            self.clock[0] += 1.0 if i == 0 else 0.1
            for p in logits_processor:
                p(input_ids, None)


def test_bench_generate_times_decode_steps_only(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(B, "_build_variants", lambda model, *a, **k: {"dense-eager": model})
    cells = bench_generate(_FakeClockModel(clock), None, PopConfig(), new_tokens=5, rounds=3, variants=("dense-eager",))
    c = cells["dense-eager"]
    assert c.times == pytest.approx([10.0] * 3) and c.prefill_s == pytest.approx(1.0)


def test_fused_baseline_computes_the_same_function_sharing_the_down_weights():
    model = tiny_model("llama")
    fused = fused_copy(model)
    mlp = fused.model.layers[0].mlp
    assert type(mlp).__name__ == "FusedGatedFFN" and mlp.gate_up_proj.weight.shape == (256, 64)
    assert mlp.down_proj.weight is model.model.layers[0].mlp.down_proj.weight  # shared, not copied
    assert fused.model.embed_tokens.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 200, (2, 7))
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # the original is untouched


def test_sliced_ideal_fuses_gate_and_up_like_pop():
    model = tiny_model("llama")
    sliced = sliced_copy(model, lambda d_ff: 40, fused=True)
    assert sliced.model.layers[0].mlp.gate_up_proj.weight.shape == (80, 64)


def test_a_pop_variant_that_is_not_pop_everywhere_is_refused():
    import pop_fx

    torch._dynamo.reset()
    ok = pop_fx.compile(FFNStack(16, 32, 2), sparsity=0.5, lowering="eager")
    only_prefill = pop_fx.compile(FFNStack(16, 32, 2, seed=1), sparsity=0.5, lowering="eager")
    with torch.no_grad():
        ok(torch.randn(1, 4, 16))
        ok(torch.randn(1, 1, 16))
        only_prefill(torch.randn(1, 4, 16))  # its decode graph never ran through the pop backend
    B.require_fully_rewritten("pop", ok)
    for m in (only_prefill, pop_fx.compile(tiny_model("llama"), sparsity=0.5, lowering="eager")):
        with pytest.raises(RuntimeError, match="is not POP at every FFN site"):
            B.require_fully_rewritten("pop", m)


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
