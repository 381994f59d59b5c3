"""pop_fx.integrations.vllm: the parts that need no vLLM run everywhere (a vLLM-shaped MLP and InputBatch);
the plugin's registration runs only where ``import vllm`` works."""

import types

import numpy as np
import pytest
import torch
from torch import nn

from pop_fx.config import PopConfig
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


def _batch(idx, counts, prefill_len, done, pad=0):
    n = len(idx)
    done = np.array(done)
    prefill_len = np.array(prefill_len)
    return types.SimpleNamespace(
        num_reqs=n, idx_mapping_np=np.array(idx), num_scheduled_tokens=np.array(counts, dtype=np.int32),
        is_prefilling_np=done < prefill_len, prefill_len_np=prefill_len, num_computed_prefill_tokens_np=done,
        num_tokens_after_padding=sum(counts) + pad, has_prefill=bool((done < prefill_len).any()))


def test_step_from_an_input_batch():
    step = plugin.VllmStep(32, "cpu")
    # slot 5: first chunk of a 6-token prompt; slot 2: decoding; slot 7: last chunk (4 of 7 done); 2 padding rows
    step.update(_batch([5, 2, 7], [3, 1, 3], [6, 4, 7], [0, 4, 4], pad=2))
    assert step.slot.tolist() == [5, 5, 5, 2, 7, 7, 7, 0, 0]
    assert step.phase.tolist() == [PREFILL] * 3 + [DECODE] + [LAST] * 3 + [DENSE] * 2
    assert step.first_chunk_slots == [5] and step.has_prefill


def test_vllm_mlp_equals_the_ragged_ffn():
    """Same weights, same steps: the plugin's MLP (vLLM's fused gate_up) gives RaggedPopFFN's outputs."""
    torch.manual_seed(0)
    vm = LlamaMLP()
    d_ff = vm.down_proj.in_features
    hf = types.SimpleNamespace()
    hf_mlp = nn.Module()
    hf_mlp.gate_proj = nn.Linear(10, d_ff, bias=False)
    hf_mlp.up_proj = nn.Linear(10, d_ff, bias=False)
    hf_mlp.down_proj = nn.Linear(d_ff, 10, bias=False)
    hf_mlp.act_fn = nn.SiLU()
    with torch.no_grad():
        hf_mlp.gate_proj.weight.copy_(vm.gate_up_proj.weight[:d_ff])
        hf_mlp.up_proj.weight.copy_(vm.gate_up_proj.weight[d_ff:])
        hf_mlp.down_proj.weight.copy_(vm.down_proj.weight)
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.3)
    vstep = plugin.VllmStep(16, "cpu")
    holder = nn.Module()
    holder.mlp = vm
    assert plugin.swap(holder, cfg, vstep, max_slots=8) == 1
    info = StepInfo()
    ref = RaggedPopFFN(hf_mlp, cfg, max_slots=8, step=info)
    g = torch.Generator().manual_seed(0)
    batches = [_batch([3, 6], [4, 5], [7, 5], [0, 0]),       # slot 3 chunk 1; slot 6 whole prompt
               _batch([3, 6], [3, 1], [7, 5], [4, 5]),       # slot 3 last chunk; slot 6 decodes
               _batch([6, 3], [1, 1], [5, 7], [5, 7], pad=1)]  # both decode, one padding row
    for b in batches:
        vstep.update(b)
        x = torch.randn(vstep.num_tokens, 10, generator=g)
        with torch.no_grad():
            y = holder.mlp(x)
            info.set(vstep.slot, vstep.phase)
            expect = ref(x)
        torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)


def test_register_is_a_no_op_without_the_variable(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    assert plugin.config_from_env() is None
    plugin.register()  # must not import vllm


def test_register_patches_vllms_model_runner(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    monkeypatch.setenv(plugin.ENV, '{"sparsity": 0.5}')
    plugin.register()
    assert GPUModelRunner._pop_fx and GPUModelRunner.prepare_inputs.__name__ == "prepare_inputs"
