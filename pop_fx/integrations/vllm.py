"""vLLM plugin: POP in the MLPs of Llama/Qwen2/Qwen3/Mistral models served by vLLM.

Install pop-fx beside vLLM and switch it on with an environment variable (nothing changes without it):

    POP_FX_VLLM='{"sparsity": 0.5, "candidate_ratio": 0.1}' python my_vllm_script.py

The entry point (pyproject ``[project.entry-points."vllm.general_plugins"] pop_fx = "pop_fx.integrations.vllm:register"``)
is called by ``vllm.plugins.load_general_plugins`` in every vLLM process; ``register()`` patches the model runner
that will run, and raises if it cannot (POP switched on never generates dense in silence):

* **V1 ``CPUModelRunner``** (vllm/v1/worker/cpu_model_runner.py): what vLLM 0.32's CPU build runs (its V2 runner
  needs Triton). Run, and tested, here: see docs/vllm.md.
* **V2 ``GPUModelRunner``** (vllm/v1/worker/gpu/model_runner.py): the GPU path, written against vLLM's source and
  never run (no GPU, and vLLM's CUDA wheel pulls a CUDA torch).
* the **V1 ``GPUModelRunner``** (vllm/v1/worker/gpu_model_runner.py) and every other runner: refused at load.

On the V1 CPU runner, per step:

1. ``execute_model`` (wrapped) reads the step's ``SchedulerOutput`` — new, resumed, finished requests, and
   ``num_scheduled_tokens`` — into the plugin's own request → slot map (``Requests``): vLLM's batch rows move
   when requests finish (``InputBatch.condense``/``swap_states``), a slot stays a request's until it finishes.
   Each scheduled token gets a phase from its position: prompt tokens not yet seen PREFILL (LAST in the chunk
   that reaches the prompt's end), prompt tokens seen before a preemption DENSE (their Σh² is in the slot
   already), generated tokens DECODE.
2. the model's ``forward`` (wrapped on the instance) lays the rows out in ``runner.input_batch.req_ids`` order,
   the order of vLLM's flat batch, and picks the step's decode path (``VllmStep.set_rows``).
3. every ``PopVllmMLP`` reads that step: prefill rows dense into the slots' Σh² (``pop::ragged_prefill``),
   decode rows through R + their own top candidates, by one of three paths — ``layouts`` (each request's R ∪ C
   rows copied into its own oneDNN GEMV weights), ``ragged`` (vLLM's dense projections, masked), or ``dense``
   (vLLM's own MLP: not POP). ``decode="auto"`` picks, per decode batch size, the fastest of the three as timed
   at load; ``"pop"`` the faster POP path (every token POP); ``"layouts"``/``"ragged"`` force one. vLLM's
   compiled model is traced once, so there the MLP is ``torch.cond`` between vLLM's own MLP (compiled in the
   graph: dense steps) and the opaque ``pop::vllm_mlp`` (POP steps, path chosen at run time).

Requests equal ``pop_fx.reference.pruned(scope="sequence", prefill="dense")`` on each request alone
(tests/pop_fx/serving/test_vllm_engine.py), with two stated exceptions: under ``decode="auto"`` a step whose
decode batch runs dense decodes dense tokens, and with prefix caching a new request's partition is its uncached
prompt tokens' (cached blocks never pass through the MLP; ``enable_prefix_caching=False`` avoids it).
Preemption keeps a request's partition (its slot, or a host copy when the slot is needed).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from pop_fx import partition as P
from pop_fx.config import PopConfig
from pop_fx.integrations import keep_top
from pop_fx.integrations.keep_top import keep_top_
from pop_fx.ops.ragged_prefill import ragged_prefill
from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL
from pop_fx.serving.ragged_decode import keep_mask

ENV = "POP_FX_VLLM"
"""JSON: PopConfig fields (sparsity, candidate_ratio), ``decode`` and ``layout_mb`` (``Options``); unset = the
plugin does nothing"""

MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
DECODE_PATHS = ("layouts", "ragged", "dense")
LAYOUT_ALIGN = 32
"""R ∪ C rows per slot are padded to this: vLLM's CPU ``silu_and_mul`` needs a multiple of its vector width (32
bf16 values in an AVX-512 register)"""

log = logging.getLogger("vllm.pop_fx")  # a child of vLLM's logger: its handler prints our lines


@dataclass(frozen=True)
class Options:
    """What ``POP_FX_VLLM`` asks for."""

    pop: PopConfig
    decode: str = "auto"
    """"auto": per decode batch size the fastest of layouts / ragged / dense, timed at load (dense: not POP);
    "pop": the faster of layouts / ragged (every token POP); "layouts" or "ragged": that path always"""
    layout_mb: float = 2048
    """MiB for per-slot R ∪ C copies (all layers, requests alive); a request past it decodes without layouts"""

    @classmethod
    def from_env(cls) -> "Options | None":
        raw = os.environ.get(ENV)
        if not raw:
            return None
        fields = json.loads(raw)
        decode = fields.pop("decode", "auto")
        layout_mb = float(fields.pop("layout_mb", cls.layout_mb))
        if decode not in ("auto", "pop", "layouts", "ragged"):
            raise ValueError(f"{ENV}: decode={decode!r} is invalid: allowed 'auto', 'pop', 'layouts', 'ragged'")
        return cls(PopConfig.from_options(fields), decode, layout_mb)


def config_from_env() -> PopConfig | None:
    opts = Options.from_env()
    return None if opts is None else opts.pop


# ---------------------------------------------------------------- one step -------------------------------------
@dataclass
class VllmStep:
    """The step every ``PopVllmMLP`` reads: one slot and one phase per token row, and the decode path."""

    slot: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    phase: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    acc: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """rows whose h² adds to their slot's Σh² (PREFILL, LAST)"""
    last: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    path: str = "dense"
    """"dense" (vLLM's MLP), "ragged" (some prefill row, or the chosen decode path), "layouts" (decode only)"""
    has_prefill: bool = False
    fixed: list[int] = field(default_factory=list)
    """slots whose partition is fixed in this step (a LAST row) and that get per-slot layouts after it"""
    decode_slots: list[int] = field(default_factory=list)
    """the slot of each row, on the host, when every row decodes"""
    table: dict[int, list[str]] = field(default_factory=dict)
    """decode batch size -> paths, fastest first (``Options.decode``; timed at load under "auto" and "pop")"""
    forced: str | None = None
    """a decode path for every decode-only step ("layouts", "ragged", "dense"), or None: ``table``'s"""
    with_layouts: set[int] = field(default_factory=set)
    """slots whose request has per-slot layouts (within ``Options.layout_mb``)"""
    pop_flag: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    """path != "dense", one persistent tensor the compiled graph's ``torch.cond`` reads"""
    paths: Counter = field(default_factory=Counter)
    """steps run per path (decode-only steps by path; "ragged" also counts every step with a prefill row)"""

    def set_rows(self, slot: np.ndarray, phase: np.ndarray, fixed: list[int]) -> None:
        self.slot, self.phase = torch.from_numpy(slot), torch.from_numpy(phase)
        self.has_prefill = bool(((phase == PREFILL) | (phase == LAST)).any())
        self.fixed = fixed
        if self.has_prefill:
            self.last = self.phase == LAST
            self.acc = (self.phase == PREFILL) | self.last
            self.path = "ragged"
        elif not (phase == DECODE).any():
            self.path = "dense"  # profile and dummy runs; a resumed request's prompt alone
        elif (phase == DECODE).all() and len(set(slot.tolist())) == len(slot):
            self.decode_slots = slot.tolist()
            paths = [self.forced] if self.forced else self.table.get(len(slot), ["ragged"])
            laid_out = self.with_layouts.issuperset(self.decode_slots)
            self.path = next((p for p in paths if p != "layouts" or laid_out), "ragged")
        else:
            self.path = "ragged"  # a resumed request's generated tokens next to its DENSE prompt rows
        if len(slot):
            self.paths[self.path] += 1
        self.pop_flag.fill_(self.path != "dense")

    def clear(self) -> None:
        self.set_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), [])


# ---------------------------------------------------------------- the MLP ---------------------------------------
class PopVllmMLP(nn.Module):
    """vLLM's gated MLP with POP per request slot. Dense rows and the ``ragged`` path run vLLM's own projections
    (its TP sharding and GEMM kernels); ``layouts`` copy each slot's R ∪ C rows from the unpacked weights
    ``w_gate_up`` [2·d_ff, d] and ``w_down`` [d, d_ff] (this rank's shard) at the slot's last prompt chunk.

    Under tensor parallelism each rank partitions its own shard of the d_ff channels (``n_keep`` of its shard):
    a valid POP partition per shard, not the single-device one."""

    def __init__(self, mlp: nn.Module, w_gate_up: Tensor | None, w_down: Tensor, config: PopConfig, step: VllmStep,
                 max_slots: int, layouts: bool = False):
        super().__init__()
        self.mlp, self.step = mlp, step
        d_ff = w_down.shape[1]
        self.sizes = P.partition_sizes(d_ff, config.sparsity, config.candidate_ratio)
        self.n_rc = self.sizes.n_R + self.sizes.n_C
        self.pad = -(-self.n_rc // LAYOUT_ALIGN) * LAYOUT_ALIGN
        self.w_gate_up, self.w_down = w_gate_up, w_down
        self.register_buffer("wd_norm", P.down_column_norm(w_down), persistent=False)
        self.register_buffer("sumsq", torch.zeros(max_slots, d_ff, dtype=torch.float64), persistent=False)
        # Until a slot's last chunk: the partition by ||Wd[:, j]|| alone (docs/spec.md's data-free fallback; no
        # request decodes before its last chunk, so only an idle slot holds it).
        part = P.split(self.wd_norm, self.sizes)
        self.register_buffer("free_rc", torch.cat([part.R, part.C]), persistent=False)
        self.register_buffer("rc_idx", self.free_rc.repeat(max_slots, 1), persistent=False)
        self.register_buffer("wd_norm_c", self.wd_norm[part.C].repeat(max_slots, 1), persistent=False)
        self.layouts = layouts and w_gate_up is not None
        self.slot_gemv: list[tuple | None] = [None] * max_slots
        """per slot, once its partition is fixed: (gate/up GEMV over R ∪ C's rows — gate then up, each padded to
        ``pad`` —, down GEMV over R ∪ C's columns, this slot's ||Wd[:, C]||)"""
        # The decode path's per-call reads as plain attributes (nn.Module's __getattr__ for submodules and buffers
        # costs microseconds, 30 layers a step)
        self.act = mlp.act_fn.forward  # vLLM's SiluAndMul: act(first half) * second half
        self.bias = mlp.down_proj.bias
        self.n_R, self.n_select = self.sizes.n_R, self.sizes.n_select
        self.empty = torch.zeros(0)
        self.calls = 0
        """forwards run (the test of a compiled model that really calls this module)"""

    # ---- slots ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_slot(self, s: int) -> None:
        self.sumsq[s].zero_()
        self.rc_idx[s].copy_(self.free_rc)
        self.wd_norm_c[s].copy_(self.wd_norm[self.free_rc[self.sizes.n_R :]])
        self.slot_gemv[s] = None

    def export_slot(self, s: int) -> dict:
        return {"sumsq": self.sumsq[s].clone(), "rc_idx": self.rc_idx[s].clone(), "wd_norm_c": self.wd_norm_c[s].clone(),
                "gemv": self.slot_gemv[s]}

    @torch.no_grad()
    def import_slot(self, s: int, saved: dict) -> None:
        self.sumsq[s].copy_(saved["sumsq"])
        self.rc_idx[s].copy_(saved["rc_idx"])
        self.wd_norm_c[s].copy_(saved["wd_norm_c"])
        g = saved["gemv"]
        self.slot_gemv[s] = None if g is None else (g[0], g[1], self.wd_norm_c[s])

    @torch.no_grad()
    def write_layout(self, s: int) -> None:
        """Slot ``s``'s R ∪ C rows as two GEMV weights (its partition was just fixed)."""
        rc, pad, n_rc = self.rc_idx[s], self.pad, self.n_rc
        wgu, wd = self.w_gate_up, self.w_down
        d_ff = wd.shape[1]
        w_in = wgu.new_zeros(2 * pad, wgu.shape[1])
        torch.index_select(wgu, 0, rc, out=w_in[:n_rc])
        torch.index_select(wgu, 0, rc + d_ff, out=w_in[pad : pad + n_rc])
        w_dn = wd.new_zeros(wd.shape[0], pad)
        w_dn[:, :n_rc] = wd.index_select(1, rc)
        self.slot_gemv[s] = (_gemv(w_in), _gemv(w_dn), self.wd_norm_c[s])

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # vLLM's compiled model is traced once: the step's path is a run-time choice between vLLM's own MLP,
            # compiled in the graph (dense steps), and one opaque op that runs POP's paths
            layer = _LAYERS.index(self)
            return torch.cond(self.step.pop_flag, lambda x: torch.ops.pop.vllm_mlp(x, layer), self.mlp, (x,))
        return self.run(x)

    def run(self, x: Tensor) -> Tensor:
        st = self.step
        self.calls += 1
        if st.path == "layouts":
            return self.decode_layouts(x)
        m, sz = self.mlp, self.sizes
        if st.path == "dense":
            return m(x)  # vLLM's own MLP: profile and dummy runs (no step), and the measured dense fallback
        if x.shape[0] != st.slot.shape[0]:
            raise RuntimeError(f"pop_fx: {x.shape[0]} token rows but the step names {st.slot.shape[0]}")
        gate_up, _ = m.gate_up_proj(x)
        h = m.act_fn(gate_up)  # vLLM's SiluAndMul: act(gate) * up, [T, d_ff / tp]
        if st.has_prefill:
            e = self.empty
            ragged_prefill(h, st.slot, st.acc, st.last, self.wd_norm, self.sumsq, self.rc_idx, self.wd_norm_c,
                           e, e, e, e, e, e, sz.n_keep, sz.n_R, sz.n_C)
            if self.layouts:
                for s in st.fixed:
                    self.write_layout(s)
        h = h * keep_mask(h, st.slot, st.phase, self.wd_norm, self.rc_idx, sz.n_R, sz.n_select)
        out, _ = m.down_proj(h)  # vLLM's own down projection (its all-reduce under TP)
        return out

    def decode_layouts(self, x: Tensor) -> Tensor:
        """Every row decodes, each through its own slot's R ∪ C GEMVs (one request per row)."""
        slots, n_R, n_rc, k, act = self.step.decode_slots, self.n_R, self.n_rc, self.n_select, self.act
        ys = []
        for t, s in enumerate(slots):
            gemv_in, gemv_down, wd_norm_c = self.slot_gemv[s]
            h = act(gemv_in(x if len(slots) == 1 else x[t : t + 1]))  # [1, pad]: R, C, then zeros
            keep_top_(h[:, n_R:n_rc], wd_norm_c, k)
            ys.append(gemv_down(h))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return y if self.bias is None else y + self.bias


def _gemv(w: Tensor):
    """x -> x @ w.T for ``w`` [N, K]: on the CPU build, vLLM's prepacked oneDNN GEMM (what its own CPU linears
    run: half ``F.linear``'s time in bf16 here), else ``F.linear``."""
    if w.device.type == "cpu":
        try:
            from vllm import _custom_ops as ops
        except ImportError:  # the unit tests, without vLLM
            ops = None
        if getattr(ops, "_supports_onednn", False):
            handle = ops.create_onednn_mm(w.t(), 32)  # copies the weights, packed
            return lambda x: ops.onednn_mm(handle, x, None)
    return lambda x: torch.nn.functional.linear(x, w)


_LAYERS: list[PopVllmMLP] = []
"""every PopVllmMLP of this process, in swap order: the compiled graph names a layer by its index here"""


@torch.library.custom_op("pop::vllm_mlp", mutates_args=())
def vllm_mlp(x: Tensor, layer: int) -> Tensor:
    return _LAYERS[layer].run(x)


@vllm_mlp.register_fake
def _(x, layer):
    return torch.empty_like(x)


# ---------------------------------------------------------------- requests ---------------------------------------
class Requests:
    """The plugin's own request -> slot map over ``n_slots`` slots, fed by each step's ``SchedulerOutput``.

    A slot is a request's from its first scheduled chunk until it finishes; a preempted request keeps it until
    the slot is needed by a scheduled request, then its state waits on the host (``parked``) until it returns."""

    def __init__(self, n_slots: int, ffns: list[PopVllmMLP], max_layouts: int = 0):
        self.ffns = ffns
        self.max_layouts = max_layouts
        """requests alive (running, preempted or parked) that may hold per-slot layouts at once"""
        self.laid_out: set[str] = set()
        self.free = list(range(n_slots))
        self.slot: dict[str, int] = {}
        self.prompt_len: dict[str, int] = {}
        self.fed: dict[str, int] = {}
        """prompt tokens whose h² is in the request's Σh² (positions below it recompute DENSE)"""
        self.parked: dict[str, list[dict]] = {}
        self.rows: dict[str, tuple[int, np.ndarray]] = {}
        """this step: request -> (slot, phase of each of its scheduled tokens)"""
        self.fixed: list[int] = []
        self.stats: Counter = Counter()
        """"chunked": prompt chunks before a last one; "resumed": preempted requests back; "parked": slot states
        moved to the host; "prefix_hits": new requests whose prompt started past a cached prefix (partitioned
        from their uncached tokens only); "no_layouts": requests past ``max_layouts`` (they decode without)"""

    def release(self, rid: str) -> None:
        s = self.slot.pop(rid, None)
        if s is not None:
            for f in self.ffns:
                f.reset_slot(s)
            self.free.append(s)
        self.parked.pop(rid, None)
        self.laid_out.discard(rid)
        self.prompt_len.pop(rid, None)
        self.fed.pop(rid, None)

    def _take_slot(self, scheduled) -> int:
        if not self.free:  # park a request that is not scheduled now (preempted or waiting for budget)
            rid = next(r for r in self.slot if r not in scheduled)
            s = self.slot.pop(rid)
            self.parked[rid] = [f.export_slot(s) for f in self.ffns]
            self.stats["parked"] += 1
            self.free.append(s)
        self.free.sort()
        return self.free.pop(0)

    def schedule(self, so) -> None:
        """Read one ``SchedulerOutput`` (vllm/v1/core/sched/output.py): slots, and each token's phase."""
        for rid in so.finished_req_ids:
            self.release(rid)
        start: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                raise RuntimeError("pop_fx: prompt embeddings are not supported (POP needs the prompt length)")
            self.release(new.req_id)  # a request id reused after an abort starts afresh
            self.prompt_len[new.req_id] = len(new.prompt_token_ids)
            self.fed[new.req_id] = new.num_computed_tokens
            self.stats["prefix_hits"] += new.num_computed_tokens > 0
            start[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        self.stats["resumed"] += len(cached.resumed_req_ids)
        start.update(zip(cached.req_ids, cached.num_computed_tokens))
        scheduled = so.num_scheduled_tokens
        self.rows, self.fixed = {}, []
        for rid, n in scheduled.items():
            if rid not in self.slot:
                s = self.slot[rid] = self._take_slot(scheduled)
                saved = self.parked.pop(rid, None)
                for i, f in enumerate(self.ffns):
                    f.import_slot(s, saved[i]) if saved else f.reset_slot(s)
            c, P_, fed = start[rid], self.prompt_len[rid], self.fed[rid]
            pos = np.arange(c, c + n)
            prompt = np.where(c + n >= P_, LAST, PREFILL)
            phase = np.where(pos >= P_, DECODE, np.where(pos < fed, DENSE, prompt)).astype(np.int64)
            if fed < P_ <= c + n and len(self.laid_out) < self.max_layouts:
                self.laid_out.add(rid)
                self.fixed.append(self.slot[rid])
            elif fed < P_ <= c + n:
                self.stats["no_layouts"] += 1
            elif fed < c + n < P_:
                self.stats["chunked"] += 1
            self.fed[rid] = max(fed, min(c + n, P_))
            self.rows[rid] = (self.slot[rid], phase)

    @property
    def layout_slots(self) -> set[int]:
        return {self.slot[r] for r in self.laid_out if r in self.slot}

    def layout(self, req_ids: list[str], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, phase) of the step's ``n_rows`` token rows, requests in vLLM's batch order; padding rows DENSE."""
        slot = np.zeros(n_rows, np.int64)
        phase = np.full(n_rows, DENSE, np.int64)
        a = 0
        for rid in req_ids:
            s, ph = self.rows[rid]
            slot[a : a + len(ph)] = s
            phase[a : a + len(ph)] = ph
            a += len(ph)
        if a > n_rows:
            raise RuntimeError(f"pop_fx: the step has {n_rows} token rows but the scheduler sent {a}")
        return slot, phase


# ---------------------------------------------------------------- attaching --------------------------------------
def swap(model: nn.Module, make) -> list[PopVllmMLP]:
    """Replace the MLP of every decoder layer whose class is in ``MLP_CLASSES`` by ``make(mlp)``."""
    owners = [m for m in model.modules()
              if not isinstance(m, PopVllmMLP) and type(getattr(m, "mlp", None)).__name__ in MLP_CLASSES]
    ffns = []
    for module in owners:  # collected first: a PopVllmMLP holds the MLP it wraps as .mlp too
        module.mlp = make(module.mlp)
        ffns.append(module.mlp)
    _LAYERS.extend(ffns)
    return ffns


class _KeepUnpacked:
    """While vLLM loads the model, keep each MLP linear's weight before the CPU build repacks it for oneDNN and
    empties ``layer.weight`` (``UnquantizedLinearMethod.process_weights_after_loading``,
    vllm/model_executor/layers/linear.py; ``dispatch_cpu_unquantized_gemm``, vllm/model_executor/layers/utils.py)."""

    def __init__(self):
        self.weights: dict[int, Tensor] = {}

    def __enter__(self):
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        self.cls, self.orig = UnquantizedLinearMethod, UnquantizedLinearMethod.process_weights_after_loading
        kept = self.weights

        def keep(method, layer):
            if getattr(layer, "prefix", "").endswith(("mlp.gate_up_proj", "mlp.down_proj")):
                kept[id(layer)] = layer.weight.data
            return self.orig(method, layer)

        self.cls.process_weights_after_loading = keep
        return self

    def __exit__(self, *exc):
        self.cls.process_weights_after_loading = self.orig


class PopV1:
    """POP attached to one V1 ``CPUModelRunner``."""

    def __init__(self, runner, options: Options, kept: dict[int, Tensor]):
        cfg = runner.vllm_config
        if cfg.speculative_config is not None:
            raise RuntimeError("pop_fx: speculative decoding is not supported (a step would decode several "
                               "tokens of one request)")
        self.runner, self.options = runner, options
        # vLLM's compile cache keys on the config, not on the modules: without this, a compiled dense model cached
        # earlier would be loaded and run with vLLM's MLPs (seen: same torch_aot_compile hash for both).
        if not isinstance(cfg.additional_config, dict):
            raise RuntimeError("pop_fx: vllm_config.additional_config is not a dict: cannot key the compile cache")
        cfg.additional_config["pop_fx"] = repr(options)
        self.step = VllmStep(forced=options.decode if options.decode in ("layouts", "ragged") else None)
        S = runner.max_num_reqs

        def make(mlp):
            wgu, wd = kept.get(id(mlp.gate_up_proj)), kept.get(id(mlp.down_proj))
            if wd is None:
                wd = mlp.down_proj.weight
            if wd.numel() == 0 or getattr(mlp.gate_up_proj, "bias", None) is not None:
                raise RuntimeError(f"pop_fx: {type(mlp).__name__} has quantized, prepacked or biased projections "
                                   "(POP needs the unquantized gate_up and down weights, gate_up without bias)")
            return PopVllmMLP(mlp, wgu, wd, options.pop, self.step, S, layouts=options.decode != "ragged")

        self.ffns = swap(runner.model, make)
        if not self.ffns:
            raise RuntimeError(f"pop_fx: {ENV} is set but {type(runner.model).__name__} has no MLP of "
                               f"{MLP_CLASSES}: nothing to prune")
        f0 = self.ffns[0]
        per_slot = sum((3 * f.pad * f.w_down.shape[0]) * f.w_down.element_size() for f in self.ffns)
        max_layouts = min(S, int(options.layout_mb * 2**20 // per_slot)) if f0.layouts else 0
        self.requests = Requests(S, self.ffns, max_layouts)
        if f0.layouts:
            keep_top.kernel()  # the decode path's C++ selection, built (once per machine) before the first step
        if options.decode in ("auto", "pop"):
            self.step.table = measure_decode_paths(self.ffns, self.step, S, options.decode == "auto")
        self.step.clear()
        forward = runner.model.forward

        @functools.wraps(forward)
        def forward_pop(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            if self.requests.rows:
                slot, phase = self.requests.layout(runner.input_batch.req_ids, rows)
                self.step.with_layouts = self.requests.layout_slots
                self.step.set_rows(slot, phase, self.requests.fixed)
            try:
                return forward(*args, **kwargs)
            finally:
                self.requests.rows = {}
                self.step.clear()

        runner.model.forward = forward_pop
        log.info("pop_fx: POP on %d MLPs (sparsity=%s, candidate_ratio=%s), %d slots, per-slot layouts for %d "
                 "requests (%.0f MiB each), decode=%s %s", len(self.ffns), options.pop.sparsity,
                 options.pop.candidate_ratio, S, max_layouts, per_slot / 2**20, options.decode,
                 self.step.table or "")


@torch.no_grad()
def measure_decode_paths(ffns: list[PopVllmMLP], step: VllmStep, max_n: int, with_dense: bool,
                         rounds: int = 7) -> dict[int, list[str]]:
    """Decode batch size -> the paths, fastest first, timed on every MLP in turn (a step's FFN part) with random
    rows and the data-free partitions; the paths alternate within each round and each path's fastest round counts
    (load only adds). Per-slot layouts read one R ∪ C copy per request, so once they lose twice in a row they are
    not timed further; between the batch sizes timed, a batch size takes the order of the next one timed."""
    f0 = ffns[0]
    d = f0.w_down.shape[0]
    dtype = f0.w_down.dtype
    paths = [p for p in DECODE_PATHS if p != "dense" or with_dense]
    sizes = sorted({*(2**i for i in range(max_n.bit_length()) if 2**i <= max_n), max_n, 2, 3})
    sizes = [n for n in sizes if n <= max_n]
    x = torch.randn(max_n, d, dtype=dtype, generator=torch.Generator().manual_seed(0))
    built, lost, best, report = 0, 0, {}, []
    for n in sizes:
        try_paths = [p for p in paths if p != "layouts" or (lost < 2 and f0.layouts)]
        for p in try_paths:
            if p == "layouts":
                for s in range(built, n):
                    for f in ffns:
                        f.write_layout(s)
                built = max(built, n)
        times = {p: [] for p in try_paths}
        slot = np.arange(n, dtype=np.int64)
        for _ in range(rounds):
            for p in try_paths:
                step.set_rows(slot, np.full(n, DECODE, np.int64), [])
                step.path = p
                t0 = time.perf_counter()
                for f in ffns:
                    f.run(x[:n])
                times[p].append(time.perf_counter() - t0)
        med = {p: min(v) * 1e3 for p, v in times.items()}
        best[n] = sorted(med, key=med.get)
        if "layouts" in med:
            lost = lost + 1 if best[n][0] != "layouts" else 0
        report.append(f"{n}: " + ", ".join(f"{p} {v:.2f}" for p, v in med.items()))
    for f in ffns:
        for s in range(built):
            f.reset_slot(s)
    log.info("pop_fx: FFN ms per decode step, by decode batch size: %s", "; ".join(report))
    table = {}
    for n in range(1, max_n + 1):
        table[n] = best[min(m for m in sizes if m >= n)]
    return table


# ---------------------------------------------------------------- V2 (GPU, not run) ------------------------------
def update_from_v2_batch(step: VllmStep, batch) -> list[int]:
    """The step from a V2 ``InputBatch`` (vllm/v1/worker/gpu/input_batch.py): slot = ``idx_mapping`` (the
    request's ``req_states`` index, stable for its life) per token; phase from ``is_prefilling_np``,
    ``prefill_len_np`` and ``num_computed_prefill_tokens_np``; CUDA-graph padding rows DENSE. Returns the slots
    whose first chunk is in the step (their state is reset first)."""
    n_req, counts = batch.num_reqs, batch.num_scheduled_tokens[: batch.num_reqs]
    prefilling = batch.is_prefilling_np[:n_req]
    done = batch.num_computed_prefill_tokens_np[:n_req]
    last = prefilling & (done + counts >= batch.prefill_len_np[:n_req])
    req_phase = np.where(prefilling, np.where(last, LAST, PREFILL), DECODE)
    T, Tp = int(counts.sum()), batch.num_tokens_after_padding
    phase = np.full(Tp, DENSE, dtype=np.int64)
    phase[:T] = np.repeat(req_phase, counts)
    slot = np.zeros(Tp, dtype=np.int64)
    slot[:T] = np.repeat(batch.idx_mapping_np[:n_req], counts)
    fixed = batch.idx_mapping_np[:n_req][last].tolist()
    step.set_rows(slot, phase, fixed)
    return batch.idx_mapping_np[:n_req][prefilling & (done == 0)].tolist()


def _patch_v2(options: Options) -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    load_model, prepare_inputs = GPUModelRunner.load_model, GPUModelRunner.prepare_inputs

    @functools.wraps(load_model)
    def load_model_pop(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        if not self.vllm_config.model_config.enforce_eager:
            log.warning("pop_fx: the V2 path branches in Python per step: serve with enforce_eager=True")
        self._pop_step = VllmStep()
        self._pop_ffns = swap(self.model, lambda mlp: PopVllmMLP(mlp, None, mlp.down_proj.weight, options.pop,
                                                                 self._pop_step, self.max_num_reqs))
        if not self._pop_ffns:
            raise RuntimeError(f"pop_fx: {ENV} is set but the model has no MLP of {MLP_CLASSES}")
        return out

    @functools.wraps(prepare_inputs)
    def prepare_inputs_pop(self, *args, **kwargs):
        batch = prepare_inputs(self, *args, **kwargs)
        if getattr(self, "_pop_step", None) is not None:
            for s in update_from_v2_batch(self._pop_step, batch):
                for f in self._pop_ffns:
                    f.reset_slot(s)
        return batch

    GPUModelRunner.load_model = load_model_pop
    GPUModelRunner.prepare_inputs = prepare_inputs_pop


# ---------------------------------------------------------------- the entry point --------------------------------
def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch vLLM's model runners when ``POP_FX_VLLM`` is set."""
    options = Options.from_env()
    if options is None:
        return
    from vllm.v1.worker import gpu_model_runner as v1
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, "_pop_fx", False):
        return  # plugins load once per process, possibly more than once
    load_model, execute_model = CPUModelRunner.load_model, CPUModelRunner.execute_model

    @functools.wraps(load_model)
    def load_model_pop(self, *args, **kwargs):
        with _KeepUnpacked() as kept:
            out = load_model(self, *args, **kwargs)
        self._pop = PopV1(self, options, kept.weights)
        return out

    @functools.wraps(execute_model)
    def execute_model_pop(self, scheduler_output, *args, **kwargs):
        self._pop.requests.schedule(scheduler_output)
        return execute_model(self, scheduler_output, *args, **kwargs)

    CPUModelRunner.load_model, CPUModelRunner.execute_model = load_model_pop, execute_model_pop

    v1_load = v1.GPUModelRunner.load_model

    @functools.wraps(v1_load)
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"pop_fx: {ENV} is set but {type(self).__name__} (vLLM's V1 GPU model runner) is not "
                           "supported: POP attaches to the V1 CPUModelRunner and the V2 GPUModelRunner")

    v1.GPUModelRunner.load_model = refuse
    try:
        _patch_v2(options)
    except ImportError:  # a vLLM without the V2 runner: the CPU path still works
        log.warning("pop_fx: vLLM's V2 GPUModelRunner is missing: only the V1 CPU runner gets POP")
    CPUModelRunner._pop_fx = True


__all__ = ["ENV", "Options", "PopVllmMLP", "Requests", "VllmStep", "config_from_env", "measure_decode_paths",
           "register", "swap", "update_from_v2_batch", "vllm_mlp"]
