"""pop::ragged_prefill / ragged_decode / ragged_decode_layout and RaggedPopFFN against POP's definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pop_fx import partition as P
from pop_fx.config import PopConfig
from pop_fx.serving import DECODE, DENSE, LAST, PREFILL, RaggedPopFFN, StepInfo
from pop_fx.serving.ffn import swap_mlps, unswap_mlps


class _MLP(nn.Module):
    def __init__(self, d=12, d_ff=37):  # odd sizes: nothing may assume a power of two
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down_proj, self.act_fn = nn.Linear(d_ff, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def h(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


def _ffn(slots=4, layouts=False, cfg=PopConfig(sparsity=0.5, candidate_ratio=0.3)):
    torch.manual_seed(0)
    mlp = _MLP()
    step = StepInfo()
    return mlp, RaggedPopFFN(mlp, cfg, max_slots=slots, step=step, layouts=layouts), step


def _run(f, step, x, slot, phase):
    step.set(torch.tensor(slot), torch.tensor(phase))
    with torch.no_grad():
        return f(x)


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_chunked_prompt_partition_is_the_whole_prompts(cuts, seed):
    """Σh² over the chunks = Eq. 3 over the whole prompt: the partition does not depend on the chunking."""
    mlp, f, step = _ffn()
    x = torch.randn(sum(cuts), 12, generator=torch.Generator().manual_seed(seed))
    a = 0
    for i, n in enumerate(cuts):
        ph = LAST if i == len(cuts) - 1 else PREFILL
        y = _run(f, step, x[a : a + n], [2] * n, [ph] * n)
        torch.testing.assert_close(y, mlp(x[a : a + n]))  # chunks run dense
        a += n
    with torch.no_grad():
        part = P.split(P.importance(mlp.h(x), f.wd_norm), f.sizes)
    assert torch.equal(f.rc_idx[2], torch.cat([part.R, part.C]))
    assert torch.equal(f.rc_idx[0], f.free_rc)  # other slots untouched: still the data-free partition


@pytest.mark.parametrize("layouts", [False, True])
def test_decode_rows_use_their_own_slot(layouts):
    """A decode step mixing slots equals each slot's POP decode done alone (docs/spec.md's decode, per sequence)."""
    mlp, f, step = _ffn(layouts=layouts)
    g = torch.Generator().manual_seed(1)
    prompts = {s: torch.randn(3 + s, 12, generator=g) for s in (0, 1, 3)}
    for s, xp in prompts.items():
        _run(f, step, xp, [s] * len(xp), [LAST] * len(xp))
    x = torch.randn(4, 12, generator=g)
    slot, phase = [3, 0, 1, 0], [DECODE] * 4
    y = _run(f, step, x, slot, phase)
    n_R, k = f.sizes.n_R, f.sizes.n_select
    for t, s in enumerate(slot):
        with torch.no_grad():
            h = mlp.h(x[t])
            scores = P.importance(mlp.h(prompts[s]), f.wd_norm)
            part = P.split(scores, f.sizes)
            sel = P.select(h[part.C][None], f.wd_norm[part.C][None], k, per_sequence=True)[0]
            keep = torch.cat([part.R, part.C[sel]])
            expect = mlp.down_proj.weight[:, keep] @ h[keep]
        torch.testing.assert_close(y[t], expect, atol=1e-5, rtol=1e-5)
    assert n_R + k == f.sizes.n_keep


def test_dense_rows_stay_dense_and_leave_the_state_alone():
    mlp, f, step = _ffn()
    x = torch.randn(5, 12)
    before = {n: b.clone() for n, b in f.named_buffers()}
    y = _run(f, step, x, [0, 1, 1, 2, 3], [DENSE] * 5)
    torch.testing.assert_close(y, mlp(x))
    assert all(torch.equal(before[n], b) for n, b in f.named_buffers())


def test_a_step_writes_only_its_slots_rows():
    """Slot isolation at the buffer level: every state row of a slot the step does not name stays bit-identical."""
    mlp, f, step = _ffn(slots=5, layouts=True)
    _run(f, step, torch.randn(6, 12), [1, 1, 1, 3, 3, 3], [LAST] * 6)
    before = {n: b.clone() for n, b in f.named_buffers()}
    _run(f, step, torch.randn(5, 12), [2, 2, 4, 1, 3], [PREFILL, PREFILL, LAST, DECODE, DECODE])
    touched = {2, 4}
    for n, b in f.named_buffers():
        if b.dim() and b.shape[0] in (5, 6):  # per-slot buffers (layouts: one extra data-free slot)
            for s in range(b.shape[0]):
                if s not in touched:
                    assert torch.equal(b[s], before[n][s]), (n, s)


def test_reset_slot_forgets_one_slot_only():
    mlp, f, step = _ffn(layouts=True)
    _run(f, step, torch.randn(6, 12), [0, 0, 0, 1, 1, 1], [LAST] * 6)
    keep = f.export_slot(1)
    f.reset_slot(0)
    assert f.sumsq[0].abs().sum() == 0 and torch.equal(f.rc_idx[0], f.free_rc)
    assert torch.equal(f.rc_idx[1], keep["rc_idx"]) and torch.equal(f.sumsq[1], keep["sumsq"])
    # a resumed request's state moves to another slot with its layout
    f.import_slot(3, keep)
    x = torch.randn(1, 12).expand(2, 12).contiguous()
    y2 = _run(f, step, x, [1, 3], [DECODE, DECODE])
    torch.testing.assert_close(y2[0], y2[1])


def test_r0_is_dense_and_layout_budget_is_enforced():
    mlp, f, step = _ffn(cfg=PopConfig(sparsity=0.0))
    x = torch.randn(3, 12)
    _run(f, step, x, [0, 0, 0], [LAST] * 3)
    torch.testing.assert_close(_run(f, step, x, [0, 0, 0], [DECODE] * 3), mlp(x))
    with pytest.raises(ValueError, match="layout_budget"):
        RaggedPopFFN(mlp, PopConfig(), max_slots=64, step=StepInfo(), layouts=True, layout_budget=10_000)
    with pytest.raises(ValueError, match="gated FFNs"):
        RaggedPopFFN(nn.Linear(3, 3), PopConfig(), max_slots=2, step=StepInfo())


@pytest.mark.compile
def test_compiled_ragged_ffn_equals_eager():
    """The ops are graph-safe: the compiled module (a prefill step, then decode steps) gives eager's outputs and
    state. aot_eager checks the fakes, the functionalized state writes and the capture at a fraction of
    Inductor's compile time; ``python -m pop_fx.serving.bench`` runs them under Inductor on SmolLM2."""
    mlp, eager, step = _ffn(slots=3)
    compiled_f = RaggedPopFFN(mlp, PopConfig(sparsity=0.5, candidate_ratio=0.3), max_slots=3, step=step)
    compiled = torch.compile(compiled_f, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(3)
    steps = [(torch.randn(7, 12, generator=g), [0, 0, 0, 2, 2, 1, 1], [PREFILL] * 3 + [LAST] * 4),
             (torch.randn(5, 12, generator=g), [0, 0, 0, 2, 1], [LAST] * 3 + [DECODE] * 2),
             (torch.randn(3, 12, generator=g), [1, 2, 0], [DECODE] * 3)]
    for x, slot, phase in steps:
        torch.testing.assert_close(_run(compiled, step, x, slot, phase), _run(eager, step, x, slot, phase))
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_f.named_buffers()):
        assert torch.equal(a, b), n


@settings(max_examples=10, deadline=None)
@given(slots=st.lists(st.integers(0, 4), min_size=1, max_size=7), seed=st.integers(0, 100),
       n_select=st.sampled_from([None, 0, 1]))
def test_grouped_layout_decode_equals_the_per_row_loop(slots, seed, n_select):
    """``ragged_decode_grouped`` (sorted rows, one grouped GEMV per projection, fixed shapes) gives every row what
    the per-row loop over its slot's layout gives, in any slot order, repeated slots included."""
    from pop_fx.serving.ragged_decode_layout import ragged_decode_grouped, ragged_decode_layout_reference

    mlp, f, step = _ffn(slots=5, layouts=True)
    g = torch.Generator().manual_seed(seed)
    for s in range(5):  # every slot its own partition and layout
        _run(f, step, torch.randn(2 + s, 12, generator=g), [s] * (2 + s), [LAST] * (2 + s))
    x = torch.randn(len(slots), 12, generator=g)
    slot = torch.tensor(slots)
    phase = torch.full((len(slots),), DECODE)
    if seed % 2:  # a row that is not DECODE comes back 0
        phase[0] = DENSE
    k = f.sizes.n_select if n_select is None else n_select
    args = (x, slot, phase, f.w_in, f.wd_rc, f.wd_norm_c, f.sizes.n_R, k, f.act)
    want = ragged_decode_layout_reference(*args)
    with torch.no_grad():
        got = ragged_decode_grouped(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_layout_decode_compiles_without_host_sync_and_equals_eager():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
    from _host_sync import NoHostSync

    from pop_fx.serving.ragged_decode_layout import ragged_decode_grouped

    mlp, f, step = _ffn(slots=4, layouts=True)
    for s in range(4):
        _run(f, step, torch.randn(3 + s, 12), [s] * (3 + s), [LAST] * (3 + s))
    x, slot, phase = torch.randn(3, 12), torch.tensor([2, 0, 2]), torch.full((3,), DECODE)
    args = (x, slot, phase, f.w_in, f.wd_rc, f.wd_norm_c, f.sizes.n_R, f.sizes.n_select, f.act)
    with torch.no_grad():
        with NoHostSync():
            eager = ragged_decode_grouped(*args)
        torch._dynamo.reset()
        compiled = torch.compile(ragged_decode_grouped, fullgraph=True, backend="inductor")(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layouts", [False, True])
def test_compiled_decode_step_equals_eager(layouts):
    """The decode step as an engine runs it, compiled by Inductor (the serving bench's variants), equals eager."""
    mlp, f, step = _ffn(slots=4, layouts=layouts)
    for s in range(4):
        _run(f, step, torch.randn(3 + s, 12), [s] * (3 + s), [LAST] * (3 + s))
    x = torch.randn(3, 12)
    eager = _run(f, step, x, [3, 0, 3], [DECODE] * 3)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    step.set(torch.tensor([3, 0, 3]), torch.full((3,), DECODE), has_prefill=False)
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
