"""pop_fx.integrations.vllm without vLLM: vLLM-shaped MLPs, scheduler outputs and input batches. The plugin
inside a running vLLM is tests/pop_fx/serving/test_vllm_engine.py."""

import importlib.abc
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pop_fx import partition as P
from pop_fx.config import PopConfig
from pop_fx.integrations import keep_top
from pop_fx.integrations import vllm as plugin
from pop_fx.serving import DECODE, DENSE, LAST, PREFILL, RaggedPopFFN, StepInfo


class _Parallel(nn.Linear):
    """vLLM's parallel linears return (output, bias)."""

    def forward(self, x):
        return super().forward(x), None


class _SiluAndMul(nn.Module):
    def forward(self, x):
        g, u = x.chunk(2, dim=-1)
        return nn.functional.silu(g) * u


class LlamaMLP(nn.Module):  # the class name the plugin matches
    def __init__(self, d=10, d_ff=29):
        super().__init__()
        self.gate_up_proj = _Parallel(d, 2 * d_ff, bias=False)
        self.down_proj = _Parallel(d_ff, d, bias=False)
        self.act_fn = _SiluAndMul()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]


def _pop_mlp(cfg, slots=8, layouts=True, seed=0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.mlp = LlamaMLP()
    step = plugin.VllmStep()
    (f,) = plugin.swap(holder, lambda m: plugin.PopVllmMLP(m, m.gate_up_proj.weight.detach(),
                                                            m.down_proj.weight.detach(), cfg, step, slots, layouts))
    return holder, f, step


def _hf_twin(vm):
    """The same MLP in Hugging Face's layout (separate gate/up), for RaggedPopFFN."""
    d_ff = vm.down_proj.in_features
    hf = nn.Module()
    hf.gate_proj = nn.Linear(10, d_ff, bias=False)
    hf.up_proj = nn.Linear(10, d_ff, bias=False)
    hf.down_proj = nn.Linear(d_ff, 10, bias=False)
    hf.act_fn = nn.SiLU()
    with torch.no_grad():
        hf.gate_proj.weight.copy_(vm.gate_up_proj.weight[:d_ff])
        hf.up_proj.weight.copy_(vm.gate_up_proj.weight[d_ff:])
        hf.down_proj.weight.copy_(vm.down_proj.weight)
    return hf


def _rows(step, slot, phase, fixed=()):
    step.set_rows(np.array(slot, np.int64), np.array(phase, np.int64), list(fixed))


def test_vllm_mlp_equals_the_ragged_ffn():
    """Same weights, same steps (chunked prompts, decode, a padding row): the plugin's MLP (vLLM's fused gate_up)
    gives RaggedPopFFN's outputs, on the ragged path and, for decode-only steps, on per-slot layouts."""
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.3)
    holder, f, vstep = _pop_mlp(cfg)
    info = StepInfo()
    ref = RaggedPopFFN(_hf_twin(f.mlp), cfg, max_slots=8, step=info)
    g = torch.Generator().manual_seed(0)
    steps = [([3] * 4 + [6] * 5, [PREFILL] * 4 + [LAST] * 5, [6]),      # slot 3 chunk 1; slot 6 whole prompt
             ([3] * 3 + [6], [LAST] * 3 + [DECODE], [3]),                # slot 3 last chunk; slot 6 decodes
             ([6, 3, 0], [DECODE, DECODE, DENSE], []),                   # a DENSE row: the ragged path
             ([6, 3], [DECODE, DECODE], []),                             # decode only: the decode path
             ([3], [DECODE], [])]
    vstep.with_layouts = {3, 6}  # (what the request map grants: both fit the budget)
    for path in ("ragged", "layouts"):
        vstep.forced = path
        for slot, phase, fixed in steps:
            _rows(vstep, slot, phase, fixed)
            x = torch.randn(len(slot), 10, generator=g)
            with torch.no_grad():
                y = holder.mlp(x)
                info.set(torch.tensor(slot), torch.tensor(phase))
                expect = ref(x)
            torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)
        assert vstep.paths[path] >= 2
        for s in (3, 6):
            f.reset_slot(s)
            ref.reset_slot(s)


def test_dense_path_is_vllms_own_mlp():
    holder, f, step = _pop_mlp(PopConfig(sparsity=0.7))
    step.table = {2: ["dense", "layouts"]}
    _rows(step, [0, 1], [LAST, LAST], [0, 1])
    x = torch.randn(2, 10)
    with torch.no_grad():
        holder.mlp(x)
        _rows(step, [0, 1], [DECODE, DECODE])
        assert step.path == "dense"
        torch.testing.assert_close(holder.mlp(x), f.mlp(x))


@settings(max_examples=40, deadline=None)
@given(h=st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, float("nan"), float("inf")]), min_size=1,
                  max_size=12),
       k=st.integers(0, 12), seed=st.integers(0, 50), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_candidate_selection_equals_the_references(h, k, seed, dtype):
    """Ties (repeated values), -0.0, NaN and inf, fp32 and bf16 activations: the decode path keeps exactly
    ``candidate_topk``'s set, and drops the others as ``h * mask`` does (the ragged path), in its eager form and
    its C++ form."""
    row = torch.tensor([[7.0] * 3 + h + [7.0]], dtype=dtype)  # a row slice at an offset, as the decode path has
    h_c = row[:, 3:-1]
    wn = torch.rand(len(h), generator=torch.Generator().manual_seed(seed)).round(decimals=1)  # ties in the norms
    k = min(k, len(h))
    mask = torch.zeros(1, len(h), dtype=dtype)
    mask[0, P.candidate_topk(h_c, wn[None], k, per_sequence=True)[0]] = 1
    want = h_c * mask
    forms = [keep_top.keep_top_reference_] + ([keep_top.kernel()] if keep_top.kernel() else [])
    for keep in forms:
        got = row.clone()
        keep(got[:, 3:-1], wn, k)
        torch.testing.assert_close(got[:, 3:-1], want, equal_nan=True, atol=0, rtol=0)
        assert torch.equal(got[:, :3], row[:, :3]) and torch.equal(got[:, -1:], row[:, -1:])


def test_the_cpp_selection_builds_here():
    """The C++ form is what the decode path runs on this CPU: it must build where the tests run."""
    assert keep_top.kernel() is not None


def _sched(new=(), cached=(), tokens=None, finished=(), resumed=()):
    """A SchedulerOutput's fields the plugin reads (vllm/v1/core/sched/output.py)."""
    new = [types.SimpleNamespace(req_id=r, prompt_token_ids=[0] * p, num_computed_tokens=c) for r, p, c in new]
    return types.SimpleNamespace(
        scheduled_new_reqs=new, finished_req_ids=set(finished),
        scheduled_cached_reqs=types.SimpleNamespace(req_ids=[r for r, _ in cached], resumed_req_ids=set(resumed),
                                                    num_computed_tokens=[c for _, c in cached]),
        num_scheduled_tokens=dict(tokens or {}))


class _Slots:
    """A stand-in for the MLPs: records what the request map does to slots."""

    def __init__(self):
        self.log = []

    def reset_slot(self, s):
        self.log.append(("reset", s))

    def export_slot(self, s):
        self.log.append(("export", s))
        return {"from": s}

    def import_slot(self, s, saved):
        self.log.append(("import", s, saved["from"]))


def test_request_map_phases_chunks_resumes_and_parks():
    f = _Slots()
    reqs = plugin.Requests(2, [f], max_layouts=2)
    # a: 6-token prompt cut 4 + 2; b: 3-token prompt whole
    reqs.schedule(_sched(new=[("a", 6, 0), ("b", 3, 0)], tokens={"a": 4, "b": 3}))
    assert reqs.rows["a"][1].tolist() == [PREFILL] * 4 and reqs.rows["b"][1].tolist() == [LAST] * 3
    assert reqs.fixed == [reqs.slot["b"]] and reqs.stats["chunked"] == 1
    slot, phase = reqs.layout(["b", "a"], 8)  # vLLM's batch order, and one padding row
    assert slot.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and phase.tolist() == [LAST] * 3 + [PREFILL] * 4 + [DENSE]
    reqs.schedule(_sched(cached=[("a", 4), ("b", 3)], tokens={"a": 2, "b": 1}))
    assert reqs.rows["a"][1].tolist() == [LAST, LAST] and reqs.rows["b"][1].tolist() == [DECODE]
    # b is preempted (unscheduled), c arrives and needs a slot: b's state waits on the host
    reqs.schedule(_sched(new=[("c", 2, 0)], cached=[("a", 6)], tokens={"a": 1, "c": 2}))
    assert ("export", 1) in f.log and "b" in reqs.parked and reqs.slot["c"] == 1 and reqs.stats["parked"] == 1
    # a finishes; b resumes: its prompt recomputes DENSE, its one generated token DECODE, into the freed slot
    reqs.schedule(_sched(cached=[("b", 0), ("c", 2)], tokens={"b": 4, "c": 1}, finished=["a"], resumed=["b"]))
    assert reqs.rows["b"][1].tolist() == [DENSE] * 3 + [DECODE] and f.log[-1] == ("import", 0, 1)
    assert reqs.stats["resumed"] == 1 and reqs.fixed == []


def test_request_map_preempted_mid_prompt_keeps_its_partial_sum():
    """A request preempted before its last chunk resumes where its Σh² stopped, even past a cached prefix."""
    reqs = plugin.Requests(1, [_Slots()], max_layouts=1)
    reqs.schedule(_sched(new=[("a", 10, 0)], tokens={"a": 4}))
    reqs.schedule(_sched(cached=[("a", 2)], tokens={"a": 8}, resumed=["a"]))  # 2 tokens of KV survived
    assert reqs.rows["a"][1].tolist() == [DENSE] * 2 + [LAST] * 6 and reqs.fixed == [0]


def test_layouts_stay_within_their_budget():
    """Past ``max_layouts`` requests get no per-slot copies, and a decode step naming one of them takes the next
    fastest path of the table instead of layouts."""
    reqs = plugin.Requests(3, [_Slots()], max_layouts=1)
    reqs.schedule(_sched(new=[("a", 2, 0), ("b", 2, 0)], tokens={"a": 2, "b": 2}))
    assert reqs.fixed == [reqs.slot["a"]] and reqs.stats["no_layouts"] == 1
    assert reqs.layout_slots == {reqs.slot["a"]}
    step = plugin.VllmStep(table={1: ["layouts", "dense", "ragged"]}, with_layouts=reqs.layout_slots)
    _rows(step, [reqs.slot["a"]], [DECODE])
    assert step.path == "layouts"
    _rows(step, [reqs.slot["b"]], [DECODE])
    assert step.path == "dense"
    reqs.schedule(_sched(new=[("c", 2, 0)], cached=[("b", 2)], tokens={"b": 1, "c": 2}, finished=["a"]))
    assert reqs.fixed == [reqs.slot["c"]] and reqs.layout_slots == {reqs.slot["c"]}


def test_request_map_counts_prefix_cache_hits():
    reqs = plugin.Requests(1, [_Slots()])
    reqs.schedule(_sched(new=[("a", 40, 32)], tokens={"a": 8}))
    assert reqs.stats["prefix_hits"] == 1 and reqs.rows["a"][1].tolist() == [LAST] * 8


def test_v2_step_from_an_input_batch():
    """The V2 (GPU) path's step from an ``InputBatch`` (vllm/v1/worker/gpu/input_batch.py): not run in a vLLM."""
    idx, counts, prefill_len, done = [5, 2, 7], [3, 1, 3], np.array([6, 4, 7]), np.array([0, 4, 4])
    batch = types.SimpleNamespace(
        num_reqs=3, idx_mapping_np=np.array(idx), num_scheduled_tokens=np.array(counts, dtype=np.int32),
        is_prefilling_np=done < prefill_len, prefill_len_np=prefill_len, num_computed_prefill_tokens_np=done,
        num_tokens_after_padding=sum(counts) + 2)
    step = plugin.VllmStep()
    first = plugin.update_from_v2_batch(step, batch)
    assert step.slot.tolist() == [5, 5, 5, 2, 7, 7, 7, 0, 0]
    assert step.phase.tolist() == [PREFILL] * 3 + [DECODE] + [LAST] * 3 + [DENSE] * 2
    assert first == [5] and step.fixed == [7] and step.has_prefill and step.path == "ragged"


def test_measured_table_names_a_path_for_every_batch_size():
    _, f, step = _pop_mlp(PopConfig(sparsity=0.5), slots=5)
    for with_dense, allowed in ((True, set(plugin.DECODE_PATHS)), (False, {"layouts", "ragged"})):
        table = plugin.measure_decode_paths([f], step, 5, with_dense, rounds=2)
        assert sorted(table) == [1, 2, 3, 4, 5] and all(v and set(v) <= allowed for v in table.values())
    assert all(g is None for g in f.slot_gemv)  # the timing's layouts are dropped


class _NoVllm(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.asked = []

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            self.asked.append(name)
            raise ImportError(f"test: {name} must not be imported")
        return None


def test_register_without_the_variable_does_nothing_and_never_imports_vllm(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    blocker = _NoVllm()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    assert plugin.Options.from_env() is None
    plugin.register()
    assert blocker.asked == []


def test_register_switched_on_without_a_vllm_to_attach_to_raises(monkeypatch):
    """Switched on, the plugin never leaves vLLM dense in silence: no runner to patch is an error."""
    monkeypatch.setenv(plugin.ENV, '{"sparsity": 0.5}')
    monkeypatch.setattr(sys, "meta_path", [_NoVllm(), *sys.meta_path])
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match="vllm"):
        plugin.register()


def test_options_from_the_variable(monkeypatch):
    monkeypatch.setenv(plugin.ENV, '{"sparsity": 0.6, "candidate_ratio": 0.2, "decode": "pop"}')
    opts = plugin.Options.from_env()
    assert opts.pop.sparsity == 0.6 and opts.pop.candidate_ratio == 0.2 and opts.decode == "pop"
    monkeypatch.setenv(plugin.ENV, '{"decode": "fast"}')
    with pytest.raises(ValueError, match="decode"):
        plugin.Options.from_env()
