"""pop_fx.greedy: the lean decode loop equals generate(do_sample=False), eagerly and compiled, over both caches."""

import pytest
import torch

import pop_fx
from pop_fx.tools.models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").eval()


def _generate(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("static", [False, True])
def test_greedy_equals_generate_eagerly(llama, static):
    ids = torch.randint(0, llama.config.vocab_size, (2, 5))
    ref = _generate(llama, ids, 7)
    assert torch.equal(pop_fx.greedy(llama, ids, 7, static=static), ref)


def test_greedy_of_a_pop_model_equals_its_generate(llama):
    """A POP model: same tokens as its generate() (which starts from a fresh partition), twice in a row (the second
    call resets the partition the first one left)."""
    m = tiny_model("llama").eval()
    pop_fx.compile(m, sparsity=0.5, lowering="eager")
    ids = torch.randint(0, m.config.vocab_size, (1, 6))
    ref = _generate(m, ids, 9)
    dense = _generate(llama, ids, 9)
    got = pop_fx.greedy(m, ids, 9)
    assert torch.equal(got, ref)
    assert not torch.equal(ref, dense)  # POP changed something: the comparison above is not dense against dense
    other = torch.randint(0, m.config.vocab_size, (1, 6))
    pop_fx.greedy(m, other, 4)
    assert torch.equal(pop_fx.greedy(m, ids, 9), ref)


def test_greedy_through_inductor_equals_generate():
    m = tiny_model("llama").eval()
    pop_fx.compile(m, sparsity=0.5)
    ids = torch.randint(0, m.config.vocab_size, (1, 5))
    ref = _generate(m, ids, 6)
    assert torch.equal(pop_fx.greedy(m, ids, 6), ref)


def test_greedy_stops_when_every_row_has_its_eos(llama):
    ids = torch.randint(0, llama.config.vocab_size, (1, 4))
    full = pop_fx.greedy(llama, ids, 8)
    eos = int(full[0, 2])
    got = pop_fx.greedy(llama, ids, 8, eos_token_id=eos)
    first = int((full[0] == eos).nonzero()[0])
    assert torch.equal(got, full[:, : first + 1])


def test_greedy_stamps_one_time_per_token(llama):
    ids = torch.randint(0, llama.config.vocab_size, (1, 3))
    toks, t = pop_fx.greedy(llama, ids, 5, stamps=True)
    assert toks.shape == (1, 5) and len(t) == 5 and t == sorted(t)


@pytest.mark.parametrize("bad, match", [(dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids")])
def test_bad_input_names_the_parameter(llama, bad, match):
    kw = dict(input_ids=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2) | bad
    with pytest.raises(ValueError, match=match):
        pop_fx.greedy(llama, **kw)
