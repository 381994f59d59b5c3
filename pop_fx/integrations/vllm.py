"""vLLM plugin: POP's ragged FFN in the MLP of Llama/Qwen-family models served by vLLM (model runner v2).

Install pop-fx beside vLLM and enable it with an environment variable (nothing changes without it):

    POP_FX_VLLM='{"sparsity": 0.5, "candidate_ratio": 0.1}' vllm serve <llama-or-qwen-model>

The entry point (pyproject ``[project.entry-points."vllm.general_plugins"] pop_fx = "pop_fx.integrations.vllm:register"``)
is called by ``vllm.plugins.load_general_plugins`` in every vLLM process. ``register()`` then

1. wraps ``GPUModelRunner.load_model`` (vllm/v1/worker/gpu/model_runner.py): after vLLM builds the model, every
   decoder layer's ``mlp`` (``LlamaMLP``/``Qwen2MLP``/``Qwen3MLP``: ``gate_up_proj`` MergedColumnParallelLinear,
   ``act_fn`` SiluAndMul, ``down_proj`` RowParallelLinear) is replaced by ``PopVllmMLP``, which keeps vLLM's own
   projections (tensor parallelism, quantized linears, the down projection's all-reduce) and calls POP's ragged ops
   on the intermediate activation;
2. wraps ``GPUModelRunner.prepare_inputs`` (same file): from the ``InputBatch`` it returns
   (vllm/v1/worker/gpu/input_batch.py) it writes the step's token→slot map and phases into persistent buffers
   (``VllmStep``) the MLPs read: slot = ``idx_mapping`` (batch row → ``req_states`` index, stable for a request's
   life) repeated by ``num_scheduled_tokens``; phase from ``is_prefilling_np``, ``prefill_len_np`` and
   ``num_computed_prefill_tokens_np`` (a chunk is the last one when it reaches ``prefill_len``); a request's
   first chunk (``num_computed_prefill_tokens_np == 0``) zeroes its slot's Σh² first, so no alloc/free hook is
   needed; CUDA-graph padding rows are DENSE (stateless).

What vLLM provides no public hook for (so the plugin wraps private methods, which may move between releases):

* the step's request-slot map and prefill progress are not visible to model code: ``InputBatch.idx_mapping``,
  ``is_prefilling_np``, ``num_computed_prefill_tokens_np`` stay inside ``GPUModelRunner.execute_model``;
  ``set_forward_context`` (vllm/forward_context.py, ``ForwardContext``) carries only attention metadata.
  Multi-LoRA has the same need and gets it from ``LoraState``/``LoRAMapping`` inside the runner. A public
  ``ForwardContext`` field (or a per-request-state hook like ``model_state.add_request``) would remove the wrap.
* preemption: ``Scheduler._preempt_request`` (vllm/v1/core/sched/scheduler.py) frees the request and sets
  ``num_computed_tokens = 0``; the request comes back through ``scheduled_new_reqs`` with its prompt *and* its
  generated tokens as prefill, indistinguishable from a new request. POP then re-partitions from prompt+output
  (a valid POP run, but not the one the request had before). Keeping a request's partition across preemption
  (``RaggedPopFFN.export_slot``/``import_slot``, which ``pop_fx.serving.engine`` uses) needs a resume flag and
  the original prompt length in ``NewRequestData``.
* ``PopVllmMLP`` branches in Python on ``InputBatch.has_prefill`` (its prefill op syncs with the host to find the
  slots whose last chunk is in the step; decode-only steps are fixed-shape). vLLM compiles the model's forward
  once (``support_torch_compile``, vllm/compilation/decorators.py) and dispatches to the compiled code without
  re-checking Dynamo's guards on Python state, which would bake one branch in: until the prefill op
  gets a fixed-shape form or is listed in ``compilation_config.splitting_ops`` (and reads ``has_prefill`` at run
  time), serve with ``enforce_eager=True``; ``register`` warns otherwise.

Status: written against vLLM's main branch source (model runner v2); not run here (vLLM's wheel pulls a CUDA
torch). tests/pop_fx/serving/test_vllm_plugin.py runs where ``import vllm`` works.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from torch import nn

from pop_fx import partition as P
from pop_fx.config import PopConfig
from pop_fx.ops.ragged_prefill import ragged_prefill
from pop_fx.serving.ragged_decode import keep_mask
from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL

ENV = "POP_FX_VLLM"
"""JSON PopConfig fields (sparsity, candidate_ratio); unset = the plugin does nothing"""

MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


class VllmStep:
    """Persistent [max_num_tokens] slot and phase buffers, rewritten before every step (CUDA graphs read them)."""

    def __init__(self, max_num_tokens: int, device):
        self.slot_buf = torch.zeros(max_num_tokens, dtype=torch.long, device=device)
        self.phase_buf = torch.full((max_num_tokens,), DENSE, dtype=torch.long, device=device)
        self.num_tokens = 0
        self.has_prefill = False
        self.first_chunk_slots: list[int] = []

    @property
    def slot(self) -> torch.Tensor:
        return self.slot_buf[: self.num_tokens]

    @property
    def phase(self) -> torch.Tensor:
        return self.phase_buf[: self.num_tokens]

    def update(self, batch) -> None:
        """Token rows of an ``InputBatch``: slot per row, and each request's phase (see the module doc)."""
        import numpy as np

        n_req, counts = batch.num_reqs, batch.num_scheduled_tokens[: batch.num_reqs]
        prefilling = batch.is_prefilling_np[:n_req]
        done = batch.num_computed_prefill_tokens_np[:n_req]
        last = prefilling & (done + counts >= batch.prefill_len_np[:n_req])
        req_phase = np.where(prefilling, np.where(last, LAST, PREFILL), DECODE)
        T, Tp = int(counts.sum()), batch.num_tokens_after_padding
        phase = np.full(Tp, DENSE, dtype=np.int64)  # padding rows: dense and stateless
        phase[:T] = np.repeat(req_phase, counts)
        slot = np.zeros(Tp, dtype=np.int64)
        slot[:T] = np.repeat(batch.idx_mapping_np[:n_req], counts)
        self.slot_buf[:Tp].copy_(torch.from_numpy(slot), non_blocking=True)
        self.phase_buf[:Tp].copy_(torch.from_numpy(phase), non_blocking=True)
        self.num_tokens = Tp
        self.has_prefill = bool(batch.has_prefill)
        self.first_chunk_slots = batch.idx_mapping_np[:n_req][prefilling & (done == 0)].tolist()


class PopVllmMLP(nn.Module):
    """vLLM's gated MLP with POP per request slot; its projections (and their TP sharding) are vLLM's own.

    Under tensor parallelism each rank partitions its own shard of the d_ff channels (``n_keep`` of its shard):
    a valid POP partition per shard, not the single-device one."""

    def __init__(self, mlp: nn.Module, config: PopConfig, step: VllmStep, max_slots: int):
        super().__init__()
        self.mlp, self.step = mlp, step
        wd = mlp.down_proj.weight  # [d_model, d_ff / tp]
        d_ff = wd.shape[1]
        self.sizes = P.partition_sizes(d_ff, config.sparsity, config.candidate_ratio)
        n_rc = self.sizes.n_R + self.sizes.n_C
        dev = wd.device
        self.register_buffer("wd_norm", P.down_column_norm(wd).to(dev), persistent=False)
        self.register_buffer("sumsq", torch.zeros(max_slots, d_ff, dtype=torch.float64, device=dev), persistent=False)
        # Until a slot's last chunk: the partition by ||Wd[:, j]|| alone (gate/up may be quantized; docs/spec.md's
        # data-free fallback without their norms).
        part = P.split(self.wd_norm, self.sizes)
        rc = torch.cat([part.R, part.C])
        self.register_buffer("rc_idx", rc.repeat(max_slots, 1), persistent=False)
        self.register_buffer("wd_norm_c", self.wd_norm[part.C].repeat(max_slots, 1), persistent=False)
        self.register_buffer("empty", torch.zeros(0, device=dev, dtype=wd.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, m, sz = self.step, self.mlp, self.sizes
        gate_up, _ = m.gate_up_proj(x)
        h = m.act_fn(gate_up)  # SiluAndMul: act(gate) * up, [T, d_ff / tp]
        if st.has_prefill:
            if st.first_chunk_slots:
                self.sumsq[st.first_chunk_slots] = 0
            e = self.empty
            ragged_prefill(h, st.slot, st.phase <= LAST, st.phase == LAST, self.wd_norm, self.sumsq, self.rc_idx, self.wd_norm_c,
                           e, e, m.down_proj.weight, e, e, e, sz.n_keep, sz.n_R, sz.n_C)
        # The masked activations go through vLLM's own down projection (its all-reduce under TP).
        mask = keep_mask(h, st.slot, st.phase, self.wd_norm, self.rc_idx, sz.n_R, sz.n_select)
        out, _ = m.down_proj(h * mask)
        return out


def config_from_env() -> PopConfig | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    return PopConfig.from_options(json.loads(raw))


def swap(model: nn.Module, config: PopConfig, step: VllmStep, max_slots: int) -> int:
    """Replace the MLP of every decoder layer whose class is in ``MLP_CLASSES``; returns how many."""
    owners = [m for m in model.modules()
              if not isinstance(m, PopVllmMLP) and type(getattr(m, "mlp", None)).__name__ in MLP_CLASSES]
    for module in owners:  # collected first: a PopVllmMLP holds the MLP it wraps as .mlp too
        module.mlp = PopVllmMLP(module.mlp, config, step, max_slots)
    return len(owners)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch the v2 model runner when ``POP_FX_VLLM`` is set."""
    config = config_from_env()
    if config is None:
        return
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_pop_fx", False):
        return  # plugins load once per process, possibly more than once
    load_model, prepare_inputs = GPUModelRunner.load_model, GPUModelRunner.prepare_inputs

    @functools.wraps(load_model)
    def load_model_pop(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        if not self.vllm_config.model_config.enforce_eager:
            import warnings

            warnings.warn("pop_fx: serve with enforce_eager=True (see pop_fx.integrations.vllm)", stacklevel=2)
        self._pop_step = VllmStep(self.max_num_tokens, self.device)
        self._pop_sites = swap(self.model, config, self._pop_step, self.max_num_reqs)
        return out

    @functools.wraps(prepare_inputs)
    def prepare_inputs_pop(self, *args, **kwargs):
        batch = prepare_inputs(self, *args, **kwargs)
        step = getattr(self, "_pop_step", None)
        if step is not None:
            step.update(batch)
        return batch

    GPUModelRunner.load_model = load_model_pop
    GPUModelRunner.prepare_inputs = prepare_inputs_pop
    GPUModelRunner._pop_fx = True


__all__ = ["ENV", "PopVllmMLP", "VllmStep", "config_from_env", "register", "swap"]
