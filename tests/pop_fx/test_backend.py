"""End-to-end: model.compile(backend="pop") + generate() equals the eager reference (Inductor)."""

import pytest
import torch

import pop_fx
from pop_fx import PopConfig
from pop_fx.tools.models import tiny_model
from pop_fx.reference import pruned

pytestmark = pytest.mark.compile

DENSE_FAMILIES = {
    "llama": "gated", "qwen2": "gated", "qwen3": "gated", "mistral": "gated", "gemma": "gated",
    "gemma3": "gated", "phi3": "fused_gated", "gpt2": "plain", "opt": "plain",
}
NEW_TOKENS = 6
CFG = dict(sparsity=0.5, candidate_ratio=0.2)  # a wide candidate band, so per-step selection really matters


def _prompt(model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, model.config.vocab_size - 1, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: excluded from importance on both paths
    return ids, mask


def _generate(model, ids, mask, **kw):
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad,
                              output_logits=True, return_dict_in_generate=True, **kw)


def _assert_same(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))
    assert diff < atol, diff


@pytest.fixture(scope="module", params=sorted(DENSE_FAMILIES))
def family(request):
    torch._dynamo.reset()
    name = request.param
    model = tiny_model(name)
    ids, mask = _prompt(model)
    ref_model = tiny_model(name)
    with pruned(ref_model, PopConfig(**CFG)):
        ref = _generate(ref_model, ids, mask)
    pop_fx.compile(model, **CFG)
    out = _generate(model, ids, mask)
    return name, model, ids, mask, ref, out


def test_compiled_generate_equals_reference(family):
    name, model, ids, mask, ref, out = family
    _assert_same(out, ref)


def test_report_counts_every_ffn_layer(family):
    name, model, *_ = family
    rep = pop_fx.report(model)
    n = model.config.num_hidden_layers
    assert rep.counts() == {DENSE_FAMILIES[name]: n, "dense": 0}
    assert all(set(s["graphs"]) == {"prefill", "decode"} for s in rep.sites)
    sizes = pop_fx.partition_sizes(rep.sites[0]["d_ff"], CFG["sparsity"], CFG["candidate_ratio"])
    assert (rep.sites[0]["n_R"], rep.sites[0]["n_C"], rep.sites[0]["n_P"]) == sizes[1:]
    assert rep.warnings == []


def test_pruning_changes_the_output(family):
    name, model, ids, mask, ref, out = family
    dense = _generate(tiny_model(name), ids, mask)
    assert max((x - y).abs().max().item() for x, y in zip(out.logits, dense.logits)) > 1e-3


def test_second_generate_does_not_see_the_first(family):
    name, model, ids, mask, ref, out = family
    if name not in ("llama", "gpt2"):
        pytest.skip("a new prompt shape recompiles (~20 s): two families of different site kinds suffice")
    other = torch.flip(ids, dims=[1])
    _generate(model, other, torch.ones_like(other))
    again = _generate(model, ids, mask)
    _assert_same(again, ref)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sparsity_zero_equals_stock_inductor(name):
    torch._dynamo.reset()
    ids, mask = _prompt(tiny_model(name))
    stock = tiny_model(name)
    stock.compile(backend="inductor")
    expected = _generate(stock, ids, mask)
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model(name), sparsity=0.0)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    assert pop_fx.report(model).sites == []  # every site matched, none rewritten
    assert {d["reason"] for d in pop_fx.report(model).dense} == {"dense: every channel kept (sparsity 0)"}


def test_scope_sequence_equals_reference():
    torch._dynamo.reset()
    cfg = dict(sparsity=0.5, candidate_ratio=0.2, scope="sequence")
    ids, mask = _prompt(tiny_model("llama"))
    ref_model = tiny_model("llama")
    with pruned(ref_model, PopConfig(**cfg)):
        ref = _generate(ref_model, ids, mask)
    got = _generate(pop_fx.compile(tiny_model("llama"), **cfg), ids, mask)
    _assert_same(got, ref)


def test_static_cache_and_sampling_equal_reference():
    torch._dynamo.reset()
    ids, mask = _prompt(tiny_model("llama"))
    ref_model = tiny_model("llama")
    with pruned(ref_model, PopConfig(**CFG)):
        torch.manual_seed(5)
        ref = ref_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20,
                                 pad_token_id=0, cache_implementation="static")
    model = pop_fx.compile(tiny_model("llama"), **CFG)
    torch.manual_seed(5)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20,
                         pad_token_id=0, cache_implementation="static")
    assert torch.equal(got, ref)


def test_bf16_close_to_reference():
    torch._dynamo.reset()
    ids, mask = _prompt(tiny_model("llama"))
    ref_model = tiny_model("llama", dtype=torch.bfloat16)
    with pruned(ref_model, PopConfig(**CFG)):
        ref = _generate(ref_model, ids, mask)
    got = _generate(pop_fx.compile(tiny_model("llama", dtype=torch.bfloat16), **CFG), ids, mask)
    # bf16 rounding differs between Inductor's fused kernels and eager: compare the first step's logits
    # and the prompt-conditioned first token, which do not depend on earlier sampled tokens.
    assert torch.equal(got.sequences[:, : ids.shape[1] + 1], ref.sequences[:, : ids.shape[1] + 1])
    assert (got.logits[0].float() - ref.logits[0].float()).abs().max().item() < 5e-2


def test_bad_option_fails_at_compile_time_naming_the_field():
    torch._dynamo.reset()
    model = tiny_model("llama")
    model.compile(backend="pop", options={"sparsity": 1.5})
    ids, mask = _prompt(model)
    with pytest.raises(Exception, match=r"PopConfig\.sparsity=1\.5 is out of range"):
        _generate(model, ids, mask)
    with pytest.raises(ValueError, match="unknown PopConfig option"):
        pop_fx.compile(tiny_model("llama"), sparsty=0.5)


def test_backend_is_registered():
    assert "pop" in torch._dynamo.list_backends()


def test_decompile_returns_the_dense_model():
    torch._dynamo.reset()
    ids, mask = _prompt(tiny_model("llama"))
    dense = _generate(tiny_model("llama"), ids, mask)
    model = pop_fx.compile(tiny_model("llama"), **CFG)
    _generate(model, ids, mask)
    pop_fx.decompile(model)
    _assert_same(_generate(model, ids, mask), dense, atol=1e-6)


ENTRY_PATHS = {
    "pop_fx.compile": lambda m, cfg: pop_fx.compile(m, **cfg),
    "model.compile": lambda m, cfg: (m.compile(backend="pop", options=cfg), m)[1],
}


@pytest.mark.parametrize("path", sorted(ENTRY_PATHS))
def test_one_token_prompt_partitions_from_its_own_token_on_every_entry_path(path):
    # The first forward of a one-token prompt reads no KV cache: Dynamo traces it as a graph of its own, which
    # the passes treat as a prefill (docs/spec.md). Before, it took the decode graph and pruned with whatever
    # partition the previous generate() had left (model.compile) or the data-free one (pop_fx.compile).
    torch._dynamo.reset()
    cfg = dict(sparsity=0.5, candidate_ratio=0.2, lowering="eager")
    model = ENTRY_PATHS[path](tiny_model("llama"), cfg)
    one = torch.tensor([[17]])
    ref = tiny_model("llama")
    with pruned(ref, PopConfig(**cfg)):
        want = _generate(ref, one, torch.ones_like(one))
    with torch._dynamo.config.patch(recompile_limit=64):
        for ids in (torch.tensor([[5, 9, 33, 17, 40, 8]]), torch.tensor([[77, 12, 7]])):
            _generate(model, ids, torch.ones_like(ids))  # leaves a data-driven partition behind
            _assert_same(_generate(model, one, torch.ones_like(one)), want, atol=1e-6)
    assert pop_fx.report(model, PopConfig(**cfg)).warnings == []


def test_inductor_settings_reach_every_compile_fx_call(monkeypatch):
    """PopConfig.inductor is passed to Inductor for every graph the backend lowers (regional blocks and glue alike)."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def spy(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    m = tiny_model("llama").eval()
    pop_fx.compile(m, sparsity=0.5, inductor={"cpp_wrapper": True})
    m.generate(torch.randint(0, m.config.vocab_size, (1, 4)), max_new_tokens=3, do_sample=False)
    torch._dynamo.reset()
    assert len(seen) >= 3
    assert all(p.get("cpp_wrapper") is True for p in seen)
