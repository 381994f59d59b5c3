"""State found from the weights a compiled graph is called with, on every entry point.

Dynamo reuses one compiled graph for every module instance whose code and guards match and passes that
instance's weights in as inputs. POP's per-site state must therefore follow the weights of each call: two
models of one class, a deepcopy, weights changed in place and a generation continued from its returned cache
must each equal ``pop_fx.reference.pruned`` on the same input. Each case runs through ``pop_fx.compile``,
``model.compile(backend="pop")`` and ``torch.compile(model, backend="pop")`` (the last drives the forward with
a greedy loop of its own: ``torch.compile(model).generate`` runs the uncompiled forward, a torch fact).
"""

import copy
import inspect
import pickle

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import pop_fx
from pop_fx import PopConfig
from pop_fx import state as S
from pop_fx.reference import pruned
from pop_fx.tools.models import tiny_model

pytestmark = pytest.mark.compile

CFG = dict(sparsity=0.5, candidate_ratio=0.2)
EAGER = dict(CFG, lowering="eager")
PROMPT = torch.tensor([[5, 9, 33, 17, 40, 8, 77]])
STEPS = 6


# transformers 5.2x names the KV cache argument and output "cache"; earlier 5.x releases "past_key_values".
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.get("cache") if out.get("cache") is not None else out.past_key_values


def _greedy(call, ids, steps=STEPS, cache=None):
    """tokens [B, steps] and per-step logits of a greedy loop over ``call`` (a model or a compiled forward)."""
    cache = DynamicCache() if cache is None else cache
    toks, logits, x = [], [], ids
    with torch.no_grad():
        for _ in range(steps):
            out = call(input_ids=x, use_cache=True, **{CACHE: cache})
            cache = _cache_of(out)
            logits.append(out.logits[:, -1].float())
            x = logits[-1].argmax(-1, keepdim=True)
            toks.append(x)
    return torch.cat(toks, 1), torch.stack(logits), cache


def _generate(model, ids, steps=STEPS, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack([lg.float() for lg in out.logits]), out


class Entry:
    """One way in: compile a model, then run ``steps`` greedy tokens from a prompt."""

    def __init__(self, name, cfg):
        self.name, self.cfg = name, cfg

    def compile(self, model):
        if self.name == "pop_fx.compile":
            return pop_fx.compile(model, **self.cfg)
        if self.name == "model.compile":
            model.compile(backend="pop", options=self.cfg)
            return model
        return torch.compile(model, backend="pop", options=self.cfg)

    def run(self, compiled, ids=PROMPT, steps=STEPS):
        if self.name == "torch.compile":
            return _greedy(compiled, ids, steps)[:2]
        return _generate(compiled, ids, steps)[:2]


ENTRIES = ["pop_fx.compile", "model.compile", "torch.compile"]


def _reference(model, cfg, ids=PROMPT, steps=STEPS):
    with pruned(model, PopConfig(**{k: v for k, v in cfg.items() if k != "lowering"})):
        return _greedy(model, ids, steps)[:2]


def _assert_same(got, want, atol=1e-5):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    diff = (got[1] - want[1]).abs().max().item()
    assert diff <= atol, diff


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize("entry", ENTRIES)
def test_two_models_of_one_class_each_decode_with_their_own_weights(entry):
    e = Entry(entry, EAGER)
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=3)
    ca = e.compile(a)
    got_a = e.run(ca)
    cb = e.compile(b)
    got_b = e.run(cb)  # Dynamo serves b the graphs it compiled for a: b's weights are the graphs' inputs
    _assert_same(got_b, _reference(tiny_model("llama", seed=3), EAGER))
    _assert_same(got_a, _reference(tiny_model("llama", seed=0), EAGER))
    _assert_same(e.run(ca), got_a)  # a again, after b
    rep = pop_fx.report(b, PopConfig(**EAGER))
    assert rep.counts() == {"gated": 2, "dense": 0} and rep.warnings == [], str(rep)
    assert S.states_of(b.model.layers[0].mlp.down_proj.weight), "b's sites have no state of their own"


@pytest.mark.parametrize("entry", ["model.compile", "torch.compile"])
def test_two_models_through_inductor(entry):
    e = Entry(entry, CFG)
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=3)
    e.run(e.compile(a))
    _assert_same(e.run(e.compile(b)), _reference(tiny_model("llama", seed=3), CFG), atol=1e-4)


def test_deepcopy_of_a_compiled_model_runs_the_copy():
    model = pop_fx.compile(tiny_model("llama", seed=0), **EAGER)
    e = Entry("pop_fx.compile", EAGER)
    e.run(model)
    twin = copy.deepcopy(model)
    twin.load_state_dict(tiny_model("llama", seed=3).state_dict())
    _assert_same(e.run(twin), _reference(tiny_model("llama", seed=3), EAGER))
    _assert_same(e.run(model), _reference(tiny_model("llama", seed=0), EAGER))
    assert pickle.loads(pickle.dumps(twin._pop_config)) == PopConfig(**EAGER)
    pop_fx.decompile(twin)
    _assert_same(_greedy(twin, PROMPT)[:2], _greedy(tiny_model("llama", seed=3), PROMPT)[:2], atol=0)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("how", ["load_state_dict", "in_place_step"])
def test_weights_changed_after_the_first_forward(entry, how):
    e = Entry(entry, EAGER)
    model = tiny_model("llama", seed=0)
    compiled = e.compile(model)
    e.run(compiled)
    new = tiny_model("llama", seed=3)
    if how == "load_state_dict":
        model.load_state_dict(new.state_dict())
    else:  # what an optimizer step or an adapter merge does: in place, same Parameter objects
        with torch.no_grad():
            for p, q in zip(model.parameters(), new.parameters()):
                p.mul_(0.0).add_(q)
    _assert_same(e.run(compiled), _reference(new, EAGER))


def test_weights_changed_with_the_int8_proxy_refresh_its_copy():
    cfg = dict(EAGER, candidate_proxy="int8", candidate_ratio=0.4)
    model = pop_fx.compile(tiny_model("llama", seed=0), **cfg)
    e = Entry("pop_fx.compile", cfg)
    e.run(model)
    new = tiny_model("llama", seed=3)
    model.load_state_dict(new.state_dict())
    _assert_same(e.run(model), _reference(new, cfg))


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_continued_generation_equals_the_single_run(entry):
    e = Entry(entry, EAGER)
    compiled = e.compile(tiny_model("llama"))
    single = _reference(tiny_model("llama"), EAGER, steps=12)
    if entry == "torch.compile":
        toks, logits, cache = _greedy(compiled, PROMPT, 4)
        more, more_logits, _ = _greedy(compiled, toks[:, -1:], 8, cache=cache)
        got = torch.cat([toks, more], 1), torch.cat([logits, more_logits])
    else:
        toks, logits, out = _generate(compiled, PROMPT, 4)
        seq = out.sequences
        with torch.no_grad():
            more = compiled.generate(seq, attention_mask=torch.ones_like(seq), **{CACHE: _cache_of(out)},
                                     max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
        got = (torch.cat([toks, more.sequences[:, seq.shape[1]:]], 1),
               torch.cat([logits, torch.stack([lg.float() for lg in more.logits])]))
    _assert_same(got, single)


def test_the_reference_keeps_dense_experts_dense_while_decoding():
    # empty_expert="dense" under scope="batch": an expert no prefill token reached has no R; a decode step must
    # leave it dense instead of raising "a decode step came before any prefill".
    cfg = dict(CFG, empty_expert="dense")
    model = tiny_model("qwen2_moe")
    ids = torch.tensor([[5, 9, 33]])
    with pruned(model, PopConfig(**cfg)) as pol:
        _greedy(model, ids, 4)
    assert any(st.dense is True for st in pol.states.values())  # the case this test is about happened
    compiled = pop_fx.compile(tiny_model("qwen2_moe"), **cfg, lowering="eager")
    _assert_same(_generate(compiled, ids, 4)[:2], _reference(tiny_model("qwen2_moe"), cfg, ids, 4))


# ----------------------------------------------------------------------------------------------
# smaller holes found the same way
# ----------------------------------------------------------------------------------------------


def test_pop_fx_compile_takes_options_like_torch_compile():
    model = pop_fx.compile(tiny_model("llama"), options=dict(EAGER))
    assert model._pop_config == PopConfig(**EAGER)
    with pytest.raises(ValueError, match="unknown PopConfig option"):
        pop_fx.compile(tiny_model("llama"), options={"sparsty": 0.5})


def test_a_config_the_compiled_path_cannot_serve_fails_before_compiling():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"candidate_proxy='int8' with scope='sequence'"):
        pop_fx.compile(model, candidate_proxy="int8", scope="sequence")
    assert model._compiled_call_impl is None  # nothing was compiled
    with pruned(model, PopConfig(candidate_proxy="int8", scope="sequence")):  # the reference serves it
        _greedy(model, PROMPT, 2)


@pytest.mark.parametrize("entry", ENTRIES)
def test_backward_through_a_compiled_model_says_inference_only(entry):
    e = Entry(entry, EAGER)
    model = tiny_model("llama")
    compiled = e.compile(model)
    out = (compiled if entry == "torch.compile" else model)(input_ids=PROMPT)
    with pytest.raises(RuntimeError, match="pop-fx is inference-only"):
        out.logits.sum().backward()


@pytest.mark.parametrize("kw", [dict(steps=1), dict(use_cache=False)])
def test_no_decode_step_no_decode_warning(kw):
    model = pop_fx.compile(tiny_model("llama"), **EAGER)
    _generate(model, PROMPT, **kw)
    assert pop_fx.report(model).warnings == []
