"""candidate_proxy="int8-values": the int8 copy's activations as H, an exact down over the chosen channels only.

Its own method (never a change of "int8"): the copy, its stated error, the op at batch 1 and > 1, the reference,
compiled == reference on several decode steps, the graph it leaves, its fallback, its eval name and byte count.
"""

import pytest
import torch
import torch.nn.functional as F

import pop_fx
from passes.graph import pop_ops_in
from passes.pipeline import run_passes
from pop_fx import PopConfig, reference
from pop_fx.activations import ACTIVATIONS
from pop_fx.lowbit import int8_rows_mm, values_activations, values_tables
from pop_fx.ops.values_decode import values_decode
from pop_fx.partition import candidate_topk, partition_sizes
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.evaluation import parse_methods
from pop_fx.tools.models import tiny_model

CFG = PopConfig(sparsity=0.5, candidate_ratio=2.0, candidate_proxy="int8-values", lowering="eager")
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
SILU = ACTIVATIONS.index("silu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _ids(B=2, L=7, seed=1):
    ids = torch.randint(3, 200, (B, L), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_copy_has_bf16_scales_exactly_and_half_step_error():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(24, 40, generator=g) * 0.03, torch.randn(24, 40, generator=g) * 7
    gate[3] = 0.0
    q, s = values_tables(gate, up)
    assert q.dtype == torch.int8 and q.shape == (48, 40) and s.dtype == torch.bfloat16 and int(q.abs().max()) <= 127
    w = torch.cat([gate, up])
    err = (w - q.float() * s.float()[:, None]).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6)).all()  # the scale rounded UP to bf16: no clamping


def test_int8_rows_mm_error_is_the_stated_bf16_rounding():
    # x rounded to bf16 (2^-9 relative) and the product rounded to bf16 (2^-9): within 2^-7 of Σ|x||w|.
    g = torch.Generator().manual_seed(1)
    gate, up, x = torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g), torch.randn(3, 96, generator=g)
    q, s = values_tables(gate, up)
    w = q.float() * s.float()[:, None]
    got = int8_rows_mm(x, q, s)
    assert got.dtype == torch.float32 and got.shape == (3, 128)
    assert ((got - x @ w.t()).abs() <= 2 ** -7 * (x.abs() @ w.abs().t())).all()
    torch.testing.assert_close(values_activations(x, q, s, 64, SILU), F.silu(got[:, :64]) * got[:, 64:])


@pytest.mark.parametrize("B,d", [(1, 96), (3, 40), (8, 17)])
def test_rows_reduce_is_the_packed_kernel_up_to_the_sum_order(B, d):
    # The same roundings (x to bf16, the result to bf16); only the fp32 sum's order differs: each value is the
    # packed kernel's or one bf16 step from it. Eagerly and compiled by Inductor (the form the choice runs in).
    from pop_fx.lowbit import int8_rows_reduce

    g = torch.Generator().manual_seed(3)
    q, s = values_tables(torch.randn(64, d, generator=g), torch.randn(64, d, generator=g))
    x = torch.randn(B, d, generator=g) * 3
    want = int8_rows_mm(x, q, s) if d % 16 == 0 else (x.bfloat16().float() @ q.float().t() * s.float()).bfloat16().float()
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at the value
    for got in (int8_rows_reduce(x, q, s), torch.compile(int8_rows_reduce, backend="inductor", dynamic=False)(x, q, s)):
        assert got.dtype == torch.float32 and got.shape == (B, 128)
        assert ((got - want).abs() <= step * 1.01).all()
        assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("B,n_R", [(1, 0), (3, 0), (1, 5), (2, 5)])
def test_op_is_the_explicit_math(B, n_R):
    g = torch.Generator().manual_seed(2)
    d, f, d_out, n_select = 32, 40, 24, 11
    gate, up, wd, bd = (torch.randn(f, d, generator=g), torch.randn(f, d, generator=g),
                        torch.randn(d_out, f, generator=g), torch.randn(d_out, generator=g))
    q, s = values_tables(gate, up)
    x = torch.randn(B, 1, d, generator=g)
    rc = torch.cat([torch.arange(n_R) * 3, torch.tensor(sorted(set(range(f)) - set(range(0, 3 * n_R, 3))))])
    wd_norm_c = torch.linalg.vector_norm(wd, dim=0)[rc[n_R:]]
    y = values_decode(x, q, s, wd.t().contiguous(), wd, bd, rc[None], wd_norm_c, n_R, n_select, f, SILU)
    h = values_activations(x.reshape(B, d), q, s, f, SILU)
    chosen = torch.cat([rc[:n_R], rc[n_R:][candidate_topk(h[:, rc[n_R:]], wd_norm_c, n_select)]])
    mask = torch.zeros(f).index_fill_(0, chosen, 1.0)
    assert y.shape == (B, 1, d_out)
    torch.testing.assert_close(y.reshape(B, d_out), F.linear(h * mask, wd, bd), atol=1e-5, rtol=1e-5)


def _equal(want, got):
    assert torch.equal(want.sequences, got.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,B,gamma", [("llama", 1, 2.0), ("llama", 2, 2.0), ("qwen3", 2, 0.8)])
def test_compiled_equals_the_reference_on_decode_steps(family, B, gamma):
    model = tiny_model(family)
    cfg = CFG.replace(candidate_ratio=gamma)
    with torch.no_grad(), reference.pruned(model, cfg) as ctx:
        want = model.generate(**_ids(B=B), **GEN)
        assert all(s.proxy is not None and s.proxy.values for s in ctx.states.values())
    pop_fx.compile(model, cfg)
    with torch.no_grad():
        got = model.generate(**_ids(B=B), **GEN)
    rep = pop_fx.report(model)
    pop_fx.decompile(model)
    _equal(want, got)
    assert len(rep.sites) == 2 and rep.dense == [] and rep.warnings == []


def test_compiled_inductor_equals_the_reference_and_prefill_copies_no_layout():
    from pop_fx import state

    model = tiny_model("llama")
    cfg = CFG.replace(lowering="inductor")
    with torch.no_grad(), reference.pruned(model, cfg):
        want = model.generate(**_ids(B=1), **GEN)
    pop_fx.compile(model, cfg)
    with torch.no_grad():
        got = model.generate(**_ids(B=1), **GEN)
    _equal(want, got)
    sts = [st for layer in model.model.layers for st in state.all_states_of(layer.mlp.down_proj.weight)]
    assert len(sts) == 2
    for st in sts:  # no R ∪ C layout: the prefill copies nothing; the copies made once are the proxy's
        assert st.tensors["w_in"].numel() == 0 and st.tensors["wd_rc"].numel() == 0
        assert set(st.proxy) == {"q", "s", "wd_t"} and st.proxy["wd_t"].shape == (st.d_ff, st.d_out)
    pop_fx.decompile(model)


@pytest.mark.parametrize("choice,B", [("reduce_ebag", 1), ("reduce_masked", 2)])
def test_inductor_with_the_int8_rows_as_a_reduction_equals_the_reference(choice, B):
    # the reduce_* choices round where the packed kernel does (lowbit.round_bf16: Inductor would drop a
    # .to(bfloat16).float() pair), so the compiled model picks the reference's channels and tokens
    from pop_fx import autotune
    from pop_fx.tools.autotuned import pinned_compile

    model = tiny_model("llama")
    cfg = CFG.replace(lowering="inductor")
    with torch.no_grad(), reference.pruned(model, cfg):
        want = model.generate(**_ids(B=B), **GEN)
    autotune.clear()
    pinned_compile(model, cfg, "pop::values_decode", choice)
    with torch.no_grad():
        got = model.generate(**_ids(B=B), **GEN)
    chosen = {d.choice for d in autotune.decisions() if d.op == "pop::values_decode"}
    pop_fx.decompile(model)
    assert chosen == {choice}
    _equal(want, got)


def test_reference_uses_the_proxy_values_on_exactly_n_keep_channels_every_step():
    model = tiny_model("llama")
    sizes = partition_sizes(model.config.intermediate_size, CFG.sparsity, CFG.candidate_ratio)
    seen, exact = [], []
    mlp = model.model.layers[0].mlp
    with torch.no_grad(), reference.pruned(model, CFG) as ctx:
        st0 = ctx.states["model.layers.0.mlp"]
        h_in = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(), st0.last_keep.clone())))
        h_x = mlp.register_forward_pre_hook(lambda m, a: exact.append(a[0].clone()))
        model.generate(**_ids(B=1), **GEN)
        h_in.remove()
        h_x.remove()
        q, s = st0.proxy.q, st0.proxy.s
    decode = list(zip(seen, exact))[1:]
    assert len(decode) == GEN["max_new_tokens"] - 1
    for (h, keep), x in decode:
        assert int(keep.sum()) == sizes.n_keep
        h_tilde = values_activations(x.reshape(1, -1), q, s, model.config.intermediate_size, SILU)
        torch.testing.assert_close(h.reshape(1, -1), h_tilde * keep)  # H̃ on the kept channels, zero elsewhere


def test_decode_graph_ops_before_and_after():
    model = tiny_model("llama")
    ids = _ids()
    decode = capture_graphs(model, ids["input_ids"], ids["attention_mask"], max_new_tokens=2)[-1].gm

    def linears(gm):
        return sum(n.op == "call_function" and "linear" in str(n.target) for n in gm.graph.nodes)

    rw = run_passes(decode, CFG)
    n = model.config.num_hidden_layers
    assert rw.counts["decode"] == n
    assert pop_ops_in(rw.gm) == {"values_decode": n}
    assert linears(rw.gm) == linears(decode) - 3 * n  # gate, up and down of every site are gone
    assert not any(n.op == "call_function" and n.target is F.silu for n in rw.gm.graph.nodes)


def test_plain_ffn_falls_back_to_exact_scoring_and_says_so():
    model = tiny_model("gpt2")
    with torch.no_grad(), reference.pruned(model, CFG) as ctx:
        want = model.generate(**_ids(), **GEN)
        assert all(s.proxy is None for s in ctx.states.values()) and len(ctx.unsupported) == 2
    pop_fx.compile(model, CFG)
    with torch.no_grad():
        got = model.generate(**_ids(), **GEN)
    rep = pop_fx.report(model)
    pop_fx.decompile(model)
    _equal(want, got)
    assert [s["reason"] for s in rep.sites] == [
        "pop (candidate_proxy: plain site (gated FFNs with separate gate and up projections only): candidates scored "
        "exactly)"] * 2


def test_eval_method_name_and_byte_count():
    ms = parse_methods(["proxy-values-2", "proxy-1"])
    assert [(m.name, m.gamma, m.proxy) for m in ms] == [("dense", None, None), ("proxy-values-2", 2.0, "int8-values"),
                                                         ("proxy-1", 1.0, "int8")]
    from pop_fx.tools.costmodel import proxy_site_bytes, site_cost

    # SmolLM2, r=0.5, batch 1: int8 gate/up of all 1536 channels + bf16 scales + fp32 down rows of the 768 chosen.
    assert proxy_site_bytes("gated", 576, 1536, 0.5, 2.0, "int8-values") == 2 * 1536 * 576 + 2 * 2 * 1536 + 4 * 576 * 768
    dense = site_cost("gated", 576, 1536, 0.5, 2.0).dense_bytes["fp32"]
    assert abs(proxy_site_bytes("gated", 576, 1536, 0.5, 2.0, "int8-values") / dense - 1 / 3) < 1e-3
