"""Reliability of the pop backend: bad options, graphs it cannot rewrite, isolation, odd generate() modes, dtypes.

Most compiled runs use ``lowering="eager"`` (the same rewritten graph, without Inductor); a few go through
Inductor and are compared with stock Inductor.
"""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pop_fx
from pop_fx import PopConfig
from pop_fx import state as S
from pop_fx.tools.models import tiny_model
from pop_fx.reference import pruned

pytestmark = pytest.mark.compile

CFG = dict(sparsity=0.5, candidate_ratio=0.2)
EAGER = dict(CFG, lowering="eager")
NEW_TOKENS = 4
_KEEP = []  # Dynamo holds weak references to traced modules: keep them alive for the session


def _generate(model, ids, mask, new_tokens=NEW_TOKENS, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True, **kw)


def _max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _assert_same(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    assert _max_diff(a.logits, b.logits) <= atol


def _reference(family, ids, mask, cfg, **kw):
    ref = tiny_model(family, **kw.pop("model_kw", {}))
    with pruned(ref, PopConfig(**{k: v for k, v in cfg.items() if k != "lowering"})):
        return _generate(ref, ids, mask, **kw)


def _left_padded(prompts):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# bad configuration: ValueError naming field, value and what is allowed, before any work
# ----------------------------------------------------------------------------------------------

BAD = [  # one out-of-range value and one of the wrong type per field
    ("sparsity", 1.0), ("sparsity", "0.5"),
    ("candidate_ratio", 2.5), ("candidate_ratio", None),
    ("scope", "token"), ("scope", 1),
    ("prefill", "skip"), ("prefill", False),
    ("empty_expert", "zero"), ("empty_expert", 0),
    ("lowering", "aot"), ("lowering", None),
    ("mode", "fast"), ("mode", 3),
    ("max_batch_size", 0), ("max_batch_size", 2.0),
    ("debug", "yes"), ("debug", 1),
]


def _check_message(msg, field, value):
    assert f"PopConfig.{field}={value!r}" in msg and "allowed" in msg, msg


@pytest.mark.parametrize("field,value", BAD)
def test_pop_fx_compile_rejects_bad_option_before_compiling(field, value):
    model = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        pop_fx.compile(model, **{field: value})
    _check_message(str(e.value), field, value)
    assert model._compiled_call_impl is None and "generate" not in vars(model)  # nothing was done


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def _first_call_error(compile_fn, options):
    torch._dynamo.reset()
    m = _Lin()
    _KEEP.append(m)
    fn = compile_fn(m, options)
    with pytest.raises(Exception) as e:
        fn(torch.randn(2, 4))
    return e.value


_PATHS = {
    "module.compile": lambda m, o: (m.compile(backend="pop", options=o), m)[1],
    "torch.compile": lambda m, o: torch.compile(m, backend="pop", options=o),
}


@pytest.mark.parametrize("path", sorted(_PATHS))
@pytest.mark.parametrize("field,value", BAD[::2] + [("mode", 3)])
def test_compile_paths_report_bad_option_at_first_call(path, field, value):
    # Dynamo calls the backend at the first forward and wraps what it raises; the message survives.
    err = _first_call_error(_PATHS[path], {field: value})
    _check_message(str(err), field, value)


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_compile_paths_report_unknown_option_key(path):
    err = _first_call_error(_PATHS[path], {"sparsty": 0.3})
    assert "unknown PopConfig option(s) ['sparsty']" in str(err) and "allowed" in str(err)


def test_pop_fx_compile_rejects_unknown_key_and_bad_mode():
    with pytest.raises(ValueError, match=r"unknown PopConfig option\(s\) \['sparsty'\]"):
        pop_fx.compile(tiny_model("llama"), sparsty=0.5)
    with pytest.raises(ValueError, match=r"PopConfig\.mode='fast'"):
        pop_fx.compile(tiny_model("llama"), mode="fast")


# ----------------------------------------------------------------------------------------------
# graphs the passes cannot rewrite: left dense, reported with the reason, output equals stock
# ----------------------------------------------------------------------------------------------

D = 16


class _ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not a plain linear of its Parameter."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


class _DequantLinear(nn.Module):
    """Weight-only int8: the weight is a buffer, dequantized at every call (no Parameter to key state by)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        w = torch.randn(d_out, d_in)
        self.scale = w.abs().amax() / 127
        self.register_buffer("qweight", torch.round(w / self.scale).to(torch.int8))

    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scale)


class _MLP(nn.Module):
    """HF-named plain FFN (up_proj/down_proj) with a pluggable middle."""

    def __init__(self, d_ff=24, mid=torch.relu, up=nn.Linear, down=nn.Linear, flat=False):
        super().__init__()
        self.up_proj, self.down_proj, self.mid, self.flat = up(D, d_ff), down(d_ff, D), mid, flat

    def forward(self, x):
        if self.flat:  # tokens flattened to [N, d] with no input_ids in the graph: batch vs tokens unknown
            return self.down_proj(self.mid(self.up_proj(x.reshape(-1, D)))).reshape(x.shape)
        return self.down_proj(self.mid(self.up_proj(x)))


class _ScaledMLP(_MLP):
    """relu(up(x)) * scale with a learned per-channel scale: not channel-wise for the rewrite's narrower H."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(24))

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)) * self.scale)


def _break_after_act(h):
    h = torch.relu(h)
    torch._dynamo.graph_break()
    return h


def _break_before_act(h):
    torch._dynamo.graph_break()
    return torch.relu(h)


class _Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


# case -> (mlp factory, sparsity, where the report lists it: a dense row's reason, a warning, or None (docs/design.md,
# "Limits": a down projection that is no nn.Linear/Conv1D of a Parameter is not an FFN to either
# the graph matcher or the module discovery))
UNSUPPORTED = {
    "unknown_op": (lambda: _MLP(mid=lambda h: torch.sin(h) * torch.relu(h)), 0.5, "sin between the up and down"),
    # No known activation at all: still an FFN (an up projection feeds the down one), reported with the op.
    "sin_alone": (lambda: _MLP(mid=torch.sin), 0.5, "sin between the up and down"),
    "softsign": (lambda: _MLP(mid=F.softsign), 0.5, "between the up and down"),
    "per_channel_scale": (lambda: _ScaledMLP(), 0.5, "mlp.scale (a per-channel tensor)"),
    "cumsum": (lambda: _MLP(mid=lambda h: torch.cumsum(F.gelu(h), dim=-1)), 0.5, "cumsum"),
    "d_ff_too_small": (lambda: _MLP(d_ff=1), 0.6, "d_ff=1 too small for sparsity=0.6 (n_keep < 1)"),
    "foreign_up": (lambda: _MLP(up=_ScaledLinear), 0.5, "not a known elementwise op"),
    "flattened_tokens": (lambda: _MLP(flat=True), 0.5, "to tell batch from tokens"),
    # A graph break inside the block splits it over graphs (Dynamo resumes the caller in a new graph too).
    "break_before_act": (lambda: _MLP(mid=_break_before_act), 0.5, ("warning", "mlp: FFN found in no graph")),
    "break_after_act": (lambda: _MLP(mid=_break_after_act), 0.5, ("warning", "mlp: FFN found in no graph")),
    "foreign_down": (lambda: _MLP(down=_ScaledLinear), 0.5, ("warning", "mlp: FFN found in no graph")),
    "quantized_down": (lambda: _MLP(down=_DequantLinear), 0.5, None),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_ffn_is_left_dense_reported_and_exact(case):
    make, r, reason = UNSUPPORTED[case]
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block(make()).eval()
    _KEEP.append(block)
    compiled = torch.compile(block, backend="pop", options=dict(sparsity=r, lowering="eager"))
    with torch.no_grad():
        for L in (5, 1, 1):  # a prefill, then decode steps
            x = torch.randn(2, L, D)
            assert torch.equal(compiled(x), block(x))
    rep = pop_fx.report(block, PopConfig(sparsity=r, lowering="eager"))
    assert rep.sites == []
    if reason is None:
        assert rep.dense == [] and rep.warnings == []
    elif isinstance(reason, tuple):
        assert rep.dense == [] and len(rep.warnings) == 1 and reason[1] in rep.warnings[0], rep.warnings
    else:
        assert [d["path"] for d in rep.dense] == ["mlp"]
        assert reason in rep.dense[0]["reason"], rep.dense[0]["reason"]


class _TanhHead(nn.Module):
    """A block, then tanh before an LM head: the head is no FFN (no up projection feeds the tanh)."""

    def __init__(self):
        super().__init__()
        self.block = _Block(_MLP())
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, 40, bias=False)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.norm(self.block(x))))


def test_an_lm_head_after_tanh_is_not_an_ffn():
    torch._dynamo.reset()
    model = _TanhHead().eval()
    _KEEP.append(model)
    compiled = torch.compile(model, backend="pop", options=dict(EAGER))
    with torch.no_grad():
        for L in (5, 1):
            compiled(torch.randn(2, L, D))
    rep = pop_fx.report(model, PopConfig(**EAGER))
    assert [s["path"] for s in rep.sites] == ["block.mlp"] and rep.dense == [] and rep.warnings == [], str(rep)


def test_unsupported_ffn_through_inductor_equals_stock_inductor():
    """Left dense: with the linears pinned to ATen's GEMM (kernels="torch") the compiled block is stock Inductor's bit
    for bit; autotuned (the default), its decode linears may be the reduction choice of pop::linear: equal within
    fp32's rounding."""
    torch._dynamo.reset()
    block = _Block(UNSUPPORTED["unknown_op"][0]()).eval()
    _KEEP.append(block)
    x = [torch.randn(2, 5, D), torch.randn(2, 1, D)]
    with torch.no_grad():
        stock = [torch.compile(block, backend="inductor")(t) for t in x]
        torch._dynamo.reset()
        pinned = [torch.compile(block, backend="pop", options=dict(sparsity=0.5, kernels="torch"))(t) for t in x]
        torch._dynamo.reset()
        auto = [torch.compile(block, backend="pop", options=dict(sparsity=0.5))(t) for t in x]
    assert all(torch.equal(a, b) for a, b in zip(pinned, stock))
    for a, b in zip(auto, stock):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# isolation
# ----------------------------------------------------------------------------------------------

prompts = st.lists(st.lists(st.integers(4, 250), min_size=2, max_size=9), min_size=1, max_size=3)


def _compiled_with_room(**cfg):
    """A compiled tiny llama that may see many shapes: past Dynamo's recompile limit (8) new shapes would run
    uncompiled (see test_recompile_limit_hit_is_warned_and_reported), which would make these checks vacuous."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        model = pop_fx.compile(tiny_model("llama"), **cfg)
        yield model
        assert "_pop_recompile_limit_hit" not in vars(model)


@pytest.fixture(scope="module")
def seq_model():
    yield from _compiled_with_room(scope="sequence", **EAGER)


@settings(max_examples=6)
@given(batch=prompts)
def test_scope_sequence_rows_equal_their_solo_runs(seq_model, batch):
    ids, mask = _left_padded(batch)
    together = _generate(seq_model, ids, mask)
    for i, p in enumerate(batch):
        one = torch.tensor([p])
        alone = _generate(seq_model, one, torch.ones_like(one))
        assert torch.equal(together.sequences[i, ids.shape[1]:], alone.sequences[0, len(p):])
        assert max((a[i] - b[0]).abs().max().item() for a, b in zip(together.logits, alone.logits)) < 1e-4


def test_all_padding_row_is_defined_and_leaves_the_others_alone(seq_model):
    # A row with no real token partitions from zero scores (index order, docs/spec.md's tie rule): no NaN, and
    # under scope="sequence" the other rows are untouched.
    ids, mask = _left_padded([[5, 9, 33, 17], [8, 8, 8, 8]])
    mask[1] = 0
    got = _generate(seq_model, ids, mask)
    assert not any(t.isnan().any() for t in got.logits)
    _assert_same(got, _reference("llama", ids, mask, dict(EAGER, scope="sequence")))
    alone = _generate(seq_model, ids[:1], mask[:1])
    assert torch.equal(got.sequences[0], alone.sequences[0])


def test_beam_search_under_scope_sequence(seq_model):
    # generate() expands each prompt into its beams before the prefill, so a prompt's beams share one
    # partition and beam reordering (within a prompt) cannot mix prompts' partitions.
    ids, mask = _left_padded([[5, 9, 33, 17, 40], [77, 12, 3 + 4]])
    got = _generate(seq_model, ids, mask, num_beams=2)
    _assert_same(got, _reference("llama", ids, mask, dict(EAGER, scope="sequence"), num_beams=2))
    for i in range(2):
        alone = _generate(seq_model, ids[i:i + 1, mask[i].argmax():], mask[i:i + 1, mask[i].argmax():], num_beams=2)
        assert torch.equal(got.sequences[i, ids.shape[1]:], alone.sequences[0, alone.sequences.shape[1] - NEW_TOKENS:])


def test_batch_larger_than_max_batch_size_is_a_clear_error():
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model("llama"), scope="sequence", max_batch_size=1, **EAGER)
    ids, mask = _left_padded([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(Exception, match=r"batch size 2 exceeds PopConfig\.max_batch_size=1"):
        _generate(model, ids, mask)


@pytest.fixture(scope="module")
def batch_model():
    yield from _compiled_with_room(**EAGER)


@settings(max_examples=4)
@given(p1=prompts, p2=prompts)
def test_scope_batch_generate_does_not_see_the_previous_one(batch_model, p1, p2):
    ids1, mask1 = _left_padded(p1)
    ids2, mask2 = _left_padded(p2)
    _generate(batch_model, ids1, mask1)
    after = _generate(batch_model, ids2, mask2)
    _assert_same(after, _reference("llama", ids2, mask2, EAGER))


def test_beam_search_and_assisted_generation_under_scope_batch(batch_model):
    # Beam search: one partition for all beams. Assisted generation: the verification forward is a
    # multi-token chunk on a non-empty cache, a prefill graph that re-partitions from its own tokens.
    ids, mask = _left_padded([[5, 9, 33, 17, 40], [77, 12, 7]])
    _assert_same(_generate(batch_model, ids, mask, num_beams=2),
                 _reference("llama", ids, mask, EAGER, num_beams=2))
    one, one_mask = ids[:1], mask[:1]
    assistant = tiny_model("llama", seed=1)
    got = _generate(batch_model, one, one_mask, assistant_model=assistant)
    _assert_same(got, _reference("llama", one, one_mask, EAGER, assistant_model=assistant))


def test_recompile_limit_hit_is_warned_and_reported():
    # Past Dynamo's recompile limit a forward of a new shape runs uncompiled: without POP, so a decode step
    # may prune with the data-free partition. Not silent: a warning at generate() and in the report.
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model("llama"), **EAGER)
    ids, mask = _left_padded([[5, 9, 33, 17]])
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(UserWarning, match=r"recompile_limit \(1\)"):
            _generate(model, ids, mask)  # the prefill graph fills the cache; the decode graph exceeds it
        assert any("recompile_limit (1)" in w for w in pop_fx.report(model).warnings)
    pop_fx.decompile(model)
    assert "_pop_recompile_limit_hit" not in vars(model)
    torch._dynamo.reset()


def test_two_compiled_models_share_no_state():
    torch._dynamo.reset()
    a = pop_fx.compile(tiny_model("llama", seed=0), **EAGER)
    b = pop_fx.compile(tiny_model("llama", seed=3), **EAGER)
    p, q = _left_padded([[5, 9, 33, 17], [6, 40, 2 + 9, 8]]), _left_padded([[101, 7, 7, 60, 9, 31]])
    models = {"a": a, "b": b}
    solo = {(m, i): _generate(models[m], *x) for m in ("a", "b") for i, x in enumerate((p, q))}
    for m, i in [("a", 1), ("b", 0), ("b", 1), ("a", 0)]:
        _assert_same(_generate(models[m], *(p, q)[i]), solo[m, i], atol=0)
    cfg = PopConfig(**EAGER)
    sa = S.states_of(a.model.layers[0].mlp.down_proj.weight)[cfg]
    sb = S.states_of(b.model.layers[0].mlp.down_proj.weight)[cfg]
    assert all(sa.tensors[k].data_ptr() != sb.tensors[k].data_ptr() for k in S.STATE_NAMES if sa.tensors[k].numel())


def test_two_threads_generate_with_two_models_at_once():
    torch._dynamo.reset()
    models = [pop_fx.compile(tiny_model("llama", seed=s), **EAGER) for s in (0, 3)]
    inputs = [_left_padded([[5, 9, 33, 17], [6, 40, 11, 8]]), _left_padded([[101, 7, 7, 60, 9]])]
    solo = [_generate(m, *x) for m, x in zip(models, inputs)]  # also compiles: threads run warm graphs
    results, errors = [[] for _ in models], []

    def work(i):
        try:
            for _ in range(3):
                results[i].append(_generate(models[i], *inputs[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(2):
        for r in results[i]:
            _assert_same(r, solo[i], atol=0)


# ----------------------------------------------------------------------------------------------
# dtypes: each against the reference with its own tolerance
# ----------------------------------------------------------------------------------------------

# Per-step logit tolerance as a fraction of the reference's largest |logit| (teacher-forced, so errors do not
# compound). With Inductor rounding like eager (emulate_precision_casts) the compiled steps equal the reference
# on these tiny models; the tolerance leaves two bf16 ulps for another machine's BLAS, while replacing the best
# selected candidate by the worst one (a wrong row) moves some step by >= 2%
# (test_a_wrong_candidate_breaks_the_tolerance).
STEP_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _teacher_forced(model, ids, prompt_len=8):
    from pop_fx.tools.evaluation.decode import decode_rows

    teacher = torch.ones(ids.shape[0], dtype=torch.bool)
    return decode_rows(model, ids[:, :prompt_len], ids[:, prompt_len:], teacher, keep_logits=True).logits.float()


def _reference_steps(family, dtype, ids):
    ref = tiny_model(family, dtype=dtype)
    with pruned(ref, PopConfig(**CFG)):
        return _teacher_forced(ref, ids)


STEP_IDS = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("llama", torch.float16),
                                          ("gpt2", torch.bfloat16), ("gpt2", torch.float32)])
def test_every_decode_step_through_inductor_against_reference(family, dtype):
    torch._dynamo.reset()
    want = _reference_steps(family, dtype, STEP_IDS)
    # Inductor keeps fused pointwise chains in fp32 where eager rounds every op to bf16; near-tied candidates
    # then flip. emulate_precision_casts rounds like eager, so what is left to differ is the pruning itself.
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = _teacher_forced(pop_fx.compile(tiny_model(family, dtype=dtype), **CFG), STEP_IDS)
    err = (got - want).abs().amax(dim=(0, 2))  # per decode step
    assert err.max().item() <= STEP_TOL[dtype] * want.abs().max().item(), err


def test_a_wrong_candidate_breaks_the_tolerance(monkeypatch):
    # The negative control of the test above: the same comparison with the best selected candidate replaced
    # by the worst one must fail in bf16, or the tolerance could not tell a wrong row from rounding.
    import pop_fx.ops.decode as decode_op
    from pop_fx import partition as P

    def best_swapped_for_worst(h_c, wn, k, per_sequence=False):
        order = torch.sort(P.candidate_scores(h_c, wn.reshape(-1), per_sequence), descending=True).indices
        return torch.cat([order[..., 1:k], order[..., -1:]], dim=-1)

    torch._dynamo.reset()
    monkeypatch.setattr(decode_op, "candidate_topk", best_swapped_for_worst)
    want = _reference_steps("llama", torch.bfloat16, STEP_IDS)
    got = _teacher_forced(pop_fx.compile(tiny_model("llama", dtype=torch.bfloat16), **EAGER), STEP_IDS)
    assert (got - want).abs().max().item() > STEP_TOL[torch.bfloat16] * want.abs().max().item()


def test_soak_smoke():
    """examples/soak.py, 3 calls (the 200-call figures are in docs/design.md): bounded compiles, no probe drift."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    r = soak.soak(calls=3, lowering="eager", warmup=2, recompile_limit=64)
    assert r["probe_same_tokens"] and r["probe_max_logit_diff"] == 0
    assert not r["recompile_limit_hit"] and r["backend_invocations"] <= 16
    assert all(g["counts"]["match_ffn"] == 2 for g in r["graphs"])



# ----------------------------------------------------------------------------------------------
# padding: never part of the importance, wherever the graph carries it (2-D mask, 4-D mask of a static cache)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("path", ["reference", "compiled"])
def test_ids_under_the_padding_do_not_change_the_output(path, cache):
    # generate(cache_implementation="static") hands the forward a 4-D mask [B, 1, L, S]; both paths used to
    # read only a 2-D one and so counted the padding tokens in the partition (logits moved by 0.67).
    torch._dynamo.reset()
    ids, mask = _left_padded([[5, 9, 33, 17, 40, 8], [77, 12, 7]])
    other = ids.clone()
    other[1, :3] = torch.tensor([200, 201, 202])  # different ids under row 1's padding
    kw = dict(cache_implementation="static") if cache == "static" else {}
    if path == "reference":
        model = tiny_model("llama")
        with pruned(model, PopConfig(**CFG)):
            a, b = _generate(model, ids, mask, **kw), _generate(model, other, mask, **kw)
    else:
        model = pop_fx.compile(tiny_model("llama"), **EAGER)
        a, b = _generate(model, ids, mask, **kw), _generate(model, other, mask, **kw)
    L = ids.shape[1]
    assert torch.equal(a.sequences[:, L:], b.sequences[:, L:])
    assert _max_diff(a.logits, b.logits) <= 1e-5


class _MaskedBlock(nn.Module):
    """An FFN block whose forward takes a mask pop-fx cannot read as padding (3-D)."""

    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x, attention_mask):
        return x + self.mlp(x) * attention_mask[..., :1]


def test_an_unreadable_mask_is_reported_as_padding_unknown():
    torch._dynamo.reset()
    block = _MaskedBlock().eval()
    _KEEP.append(block)
    compiled = torch.compile(block, backend="pop", options=EAGER)
    with torch.no_grad():
        compiled(torch.randn(2, 5, D), torch.ones(2, 5, 3))
    rep = pop_fx.report(block, PopConfig(**EAGER))
    assert [s["path"] for s in rep.sites] == ["mlp"]
    assert "padding unknown" in rep.sites[0]["reason"], rep.sites[0]


def test_model_to_another_dtype_after_compile_follows_with_its_own_state():
    # model.to() keeps the Parameter objects (their data changes): state keyed by the Parameter alone would
    # hand the bf16 graphs the fp32 layouts. Each dtype gets its own state; going back reuses the first.
    torch._dynamo.reset()
    ids, mask = _left_padded([[5, 9, 33, 17, 40, 8], [77, 12, 7]])
    model = pop_fx.compile(tiny_model("llama"), **EAGER)
    with torch._dynamo.config.patch(recompile_limit=64):
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            model.to(dtype)
            got = _generate(model, ids, mask)
            ref = tiny_model("llama", dtype=dtype)
            ref.load_state_dict(model.state_dict())  # the weights after the round trip through bf16
            with pruned(ref, PopConfig(**CFG)):
                want = _generate(ref, ids, mask)
            _assert_same(got, want, atol=1e-4 if dtype == torch.float32 else 2e-2)
    layouts = {st.tensors["w_in"].dtype for st in S.all_states_of(model.model.layers[0].mlp.down_proj.weight)}
    assert layouts == {torch.float32, torch.bfloat16}


def test_long_prompts_and_varied_shapes_through_inductor():
    # A 1.5k-token prompt, then a batch of two 1k-token ones (the recompile makes sizes symbolic): the prefill's
    # importance is one pass over H. Other batch sizes and lengths: the hypothesis tests above (eager lowering).
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model("llama"), **CFG)
    g = torch.Generator().manual_seed(11)
    shapes = [(1, 1536), (2, 1024)]
    with torch._dynamo.config.patch(recompile_limit=64):
        for batch, length in shapes:
            prompts = [torch.randint(4, 250, (length - 3 * i,), generator=g).tolist() for i in range(batch)]
            ids, mask = _left_padded(prompts)
            _assert_same(_generate(model, ids, mask, new_tokens=3), _reference("llama", ids, mask, CFG, new_tokens=3))
    assert pop_fx.report(model).warnings == []
