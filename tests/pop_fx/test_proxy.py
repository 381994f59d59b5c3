"""Proxy-scored candidates (PopConfig.candidate_proxy): quantization, the reference, the compiled ops, reports."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pop_fx
from pop_fx import PopConfig, reference
from passes.pipeline import run_passes
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.evaluation import parse_methods
from pop_fx.activations import ACTIVATIONS
from pop_fx.lowbit import dequantize, pack_int3, proxy_tables, quantize_rows, quantize_rows_int3, unpack_int3
from pop_fx.ops.gather_in import gather_in
from pop_fx.ops.proxy_select import proxy_activation
from pop_fx.tools.models import tiny_model
from pop_fx.partition import partition_sizes
from passes.graph import pop_ops_in

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.8, candidate_proxy="int8")
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Several tests here compile the same tiny model class: keep each clear of Dynamo's recompile limit.
    torch._dynamo.reset()


def _ids(B=2, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (B, L), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_config_names_the_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"candidate_proxy='int4'.*allowed one of \[None, 'int8', 'int8-gate', 'int3', 'int8-values'\]"):
        PopConfig(candidate_proxy="int4")


@given(st.integers(1, 6), st.integers(1, 40), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_quantize_rows_error_is_at_most_half_a_step(n, d, scale, seed):
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale
    w[0] = 0.0  # an all-zero row keeps a finite scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and torch.isfinite(s).all()
    err = (w - q.float() * s[:, None]).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


@given(st.integers(1, 5), st.integers(1, 41), st.integers(0, 2**31 - 1))
def test_int3_bit_planes_round_trip_at_three_bits_per_weight(n, d, seed):
    q = torch.randint(-3, 4, (n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int3(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 3, -(-d // 8))
    assert torch.equal(unpack_int3(packed, d), q.to(torch.int32))


@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_int3_quantization_error_is_at_most_half_a_step(n, d, seed):
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_rows_int3(w)
    assert ((w - dequantize(q, s, d)).abs() <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("proxy", ["int8", "int3"])
def test_proxy_activation_matches_dequantized_math_packed(proxy):
    gate, up, x = torch.randn(10, 13), torch.randn(10, 13), torch.randn(3, 13)
    q, s = proxy_tables(gate, up, proxy)
    w = dequantize(q, s, 13)
    idx = torch.tensor([1, 4, 9])
    gelu = ACTIVATIONS.index("gelu")
    torch.testing.assert_close(proxy_activation(x, q, s, idx, 10, gelu, both=True),
                               torch.nn.functional.gelu(x @ w[idx].t()) * (x @ w[10 + idx].t()), atol=1e-5, rtol=1e-5)


def test_proxy_activation_matches_dequantized_math():
    gate, up, x = torch.randn(10, 6), torch.randn(10, 6), torch.randn(3, 6)
    q, s = proxy_tables(gate, up, "int8")
    gq, uq = q[:10].float() * s[:10, None], q[10:].float() * s[10:, None]
    idx = torch.tensor([1, 4, 9])
    silu = ACTIVATIONS.index("silu")
    torch.testing.assert_close(proxy_activation(x, q, s, idx, 10, silu, both=True),
                               torch.nn.functional.silu(x @ gq[idx].t()) * (x @ uq[idx].t()))
    qg, sg = proxy_tables(gate, up, "int8-gate")
    assert qg.shape == (10, 6)
    torch.testing.assert_close(proxy_activation(x, qg, sg, idx, 10, silu, both=False),
                               torch.nn.functional.silu(x @ gq[idx].t()))


def test_gather_in_equals_rows_of_the_layout():
    n_R, n_C, d = 3, 5, 4
    w_in, b_in, x = torch.randn(2 * (n_R + n_C), d), torch.randn(2 * (n_R + n_C)), torch.randn(2, 1, d)
    sel = torch.tensor([4, 0])
    rows = torch.tensor([0, 1, 2, 3 + 4, 3 + 0, 8, 9, 10, 11 + 4, 11 + 0])
    torch.testing.assert_close(gather_in(x, w_in, b_in, sel, n_R, n_R + n_C, 2), x @ w_in[rows].t() + b_in[rows])


def _representable(model, proxy):
    """Make every gate/up row exactly representable by its proxy copy: then the proxy IS the exact activation."""
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                q, s = proxy_tables(lin.weight, None, proxy)
                lin.weight.copy_(dequantize(q, s, lin.weight.shape[1]))
    return model


@pytest.mark.parametrize("proxy", ["int8", "int3"])
def test_reference_with_an_exact_proxy_chooses_what_pop_chooses(proxy):
    model = _representable(tiny_model("llama"), proxy)
    exact = CFG.replace(candidate_proxy=None)
    with torch.no_grad():
        with reference.pruned(model, exact) as ctx:
            want = model.generate(**_ids(), **GEN)
            keep_exact = {p: s.last_keep.clone() for p, s in ctx.states.items()}
        with reference.pruned(model, CFG.replace(candidate_proxy=proxy)) as ctx:
            got = model.generate(**_ids(), **GEN)
            keep_proxy = {p: s.last_keep.clone() for p, s in ctx.states.items()}
            assert all(s.proxy is not None for s in ctx.states.values())
    assert torch.equal(want.sequences, got.sequences)
    assert all(torch.equal(keep_exact[p], keep_proxy[p]) for p in keep_exact)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_proxy_keeps_n_keep_channels_every_step_and_differs_from_exact_scoring():
    model = tiny_model("llama")
    sizes = partition_sizes(model.config.intermediate_size, CFG.sparsity, CFG.candidate_ratio)
    counts, masks = [], []
    with torch.no_grad(), reference.pruned(model, CFG) as ctx:
        st0 = ctx.states["model.layers.0.mlp"]

        def record(*_):
            counts.append(int(st0.last_keep.sum()))
            masks.append(st0.last_keep.clone())

        h = st0.site.down.register_forward_hook(record)
        model.generate(**_ids(B=1), **GEN)
        h.remove()
    assert counts[1:] and all(c == sizes.n_keep for c in counts[1:])
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks[1:]}) > 1  # the choice moves per step


@pytest.fixture(scope="module")
def compiled_llama():
    model = tiny_model("llama")
    with torch.no_grad(), reference.pruned(model, CFG):
        want = model.generate(**_ids(), **GEN)
    pop_fx.compile(model, CFG)
    with torch.no_grad():
        got = model.generate(**_ids(), **GEN)
    return model, want, got


def test_compiled_inductor_equals_the_reference(compiled_llama):
    model, want, got = compiled_llama
    assert torch.equal(want.sequences, got.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    rep = pop_fx.report(model)
    assert len(rep.sites) == 2 and rep.dense == []
    assert all(s["extra_bytes"] > 0 for s in rep.sites)


@pytest.mark.parametrize("family,proxy,lowering", [("gemma", "int8", "eager"), ("qwen3", "int8", "eager"),
                                                   ("llama", "int3", "eager"), ("qwen2", "int3", "inductor")])
def test_compiled_equals_the_reference(family, proxy, lowering):
    model = tiny_model(family)
    cfg = CFG.replace(lowering=lowering, candidate_proxy=proxy)
    with torch.no_grad(), reference.pruned(model, cfg):
        want = model.generate(**_ids(), **GEN)
    pop_fx.compile(model, cfg)
    with torch.no_grad():
        got = model.generate(**_ids(), **GEN)
    pop_fx.decompile(model)
    assert torch.equal(want.sequences, got.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decode_graph_ops_before_and_after():
    model = tiny_model("llama")
    ids = _ids()
    decode = capture_graphs(model, ids["input_ids"], ids["attention_mask"], max_new_tokens=2)[-1].gm
    rw = run_passes(decode, CFG)
    n = model.config.num_hidden_layers
    assert rw.counts["decode"] == n
    assert pop_ops_in(rw.gm) == {"proxy_select": n, "gather_in": n, "decode_sel": n}
    exact = run_passes(decode, CFG.replace(candidate_proxy=None))
    assert pop_ops_in(exact.gm) == {"decode": n}


def test_plain_ffn_falls_back_to_exact_scoring_and_says_so():
    model = tiny_model("gpt2")
    cfg = CFG.replace(lowering="eager")
    with torch.no_grad(), reference.pruned(model, cfg) as ctx:
        want = model.generate(**_ids(), **GEN)
        assert all(s.proxy is None for s in ctx.states.values()) and len(ctx.unsupported) == 2
    pop_fx.compile(model, cfg)
    with torch.no_grad():
        got = model.generate(**_ids(), **GEN)
    assert torch.equal(want.sequences, got.sequences)
    rep = pop_fx.report(model)
    pop_fx.decompile(model)
    assert rep.dense == [] and len(rep.sites) == 2
    # Each site says why it differs from the proxy path it was asked for (the reason, not only the count).
    assert [s["reason"] for s in rep.sites] == [
        "pop (candidate_proxy: plain site (gated FFNs with separate gate and up projections only): candidates scored "
        "exactly)"] * 2
    assert "candidates scored exactly" in str(rep)


def test_compiled_scope_sequence_is_refused():
    model = tiny_model("llama")
    with pytest.raises(Exception, match="candidate_proxy='int8' with scope='sequence'"):
        pop_fx.compile(model, CFG.replace(scope="sequence", lowering="eager"))
        with torch.no_grad():
            model.generate(**_ids(), **GEN)


def test_evaluation_method_names():
    ms = parse_methods(["proxy-1", "proxy-gate-0.8", "proxy-int3-1.0", "pop-0.1"])
    assert [(m.name, m.gamma, m.proxy) for m in ms] == [("dense", None, None), ("proxy-1", 1.0, "int8"),
                                                         ("proxy-gate-0.8", 0.8, "int8-gate"),
                                                         ("proxy-int3-1", 1.0, "int3"), ("pop-0.1", 0.1, None)]
    with pytest.raises(ValueError, match="method 'proxy-x' is invalid"):
        parse_methods(["proxy-x"])
