"""The engine contract: requests admitted, chunked, batched, preempted and finished by a continuous-batching
scheduler get exactly the tokens ``reference.pruned`` gives each of them alone.

CI runs a few dozen randomized schedules; ``python -m pop_fx.serving.check --schedules 200`` runs the 200
docs/serving.md quotes (same draw, same oracle).
"""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx.config import PopConfig
from pop_fx.serving import check as harness
from pop_fx.serving.engine import Engine, Policy, Spec, run_schedule, solo
from pop_fx.tools.models import tiny_model


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(1)  # tiny matrices; the CI machine is shared
    return tiny_model("llama").eval()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_every_request_equals_its_solo_reference(llama, seed):
    bad, stats = harness.check(llama, seed)
    assert not bad, f"schedule {seed} ({stats}): requests {bad} differ from their solo reference"


def test_qwen2_family():
    model = tiny_model("qwen2").eval()
    for seed in (1, 2, 3):
        bad, stats = harness.check(model, seed)
        assert not bad, (seed, stats)


def _schedule(n=5, seed=7):
    rng = random.Random(seed)
    return [Spec([rng.randrange(3, 256) for _ in range(rng.randint(6, 20))], 6, rng.randint(0, 3)) for _ in range(n)]


def test_chunked_batched_and_preempted_schedule_really_happens(llama):
    """The properties above are not vacuous: a fixed schedule chunks prompts, batches several requests per step,
    preempts and resumes, and POP changes tokens against the dense model."""
    cfg = PopConfig(sparsity=0.6, candidate_ratio=0.2)
    specs = _schedule()
    reqs = run_schedule(Engine(llama, cfg, max_slots=3), specs, random.Random(0),
                        Policy(token_budget=10, max_chunk=4, p_preempt=0.4))
    assert any(r.chunks > 1 for r in reqs) and any(r.preemptions for r in reqs)
    assert all(r.out == solo(llama, r.spec.prompt, r.spec.max_new, cfg) for r in reqs)
    dense = [solo(llama, s.prompt, s.max_new, PopConfig(sparsity=0.0)) for s in specs]
    assert any(r.out != d for r, d in zip(reqs, dense))


def test_a_leak_between_slots_is_caught(llama, monkeypatch):
    """Negative control: if one slot's prefill statistics reach another slot, the contract check fails."""
    import pop_fx.ops.ragged_prefill as rp

    real = rp.accumulate

    def leaky(h, slot, acc, sumsq):
        real(h, slot, acc, sumsq)
        real(h, (slot + 1) % sumsq.shape[0], acc, sumsq)  # every row also lands in the next slot

    monkeypatch.setattr(rp, "accumulate", leaky)
    cfg = PopConfig(sparsity=0.6, candidate_ratio=0.2)
    reqs = run_schedule(Engine(llama, cfg, max_slots=3), _schedule(), random.Random(0), Policy(token_budget=12))
    assert any(r.out != solo(llama, r.spec.prompt, r.spec.max_new, cfg) for r in reqs)


def test_idle_slots_holding_garbage_change_nothing(llama):
    """State of a slot no running request owns (NaN Σh², out-of-order indices) never reaches the others."""
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.2)
    eng = Engine(llama, cfg, max_slots=4)
    for f in eng.ffns:
        f.sumsq[3].fill_(float("nan"))
        f.rc_idx[3].copy_(f.rc_idx[3].flip(0))
        f.wd_norm_c[3].fill_(float("inf"))
    eng.free = [0, 1, 2]  # slot 3 stays idle, poisoned
    reqs = run_schedule(eng, _schedule(4), random.Random(1), Policy(token_budget=9, max_chunk=5))
    assert all(r.out == solo(llama, r.spec.prompt, r.spec.max_new, cfg) for r in reqs)
