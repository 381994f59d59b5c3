"""``RaggedPopFFN``: a gated FFN (Llama/Qwen/Mistral MLP) with POP state per request slot, for serving engines.

    step = StepInfo()                                     # shared by every layer; the engine fills it per step
    ffns = swap_mlps(model, PopConfig(sparsity=0.5), max_slots=64, step=step)
    step.set(slot=token_slot, phase=phase)                # [T] each: the step's rows, pop_fx.serving.phases
    model(...)                                            # each MLP now reads x as [T, d] rows of that step
    reset_slot(ffns, s)                                   # a request joined or left slot s: only s forgets

State per layer, ``[max_slots, …]`` each (allocated once, never resized, so a captured graph keeps reading the
same buffers): ``sumsq`` (running Σh² over the prefill chunks, fp64), ``rc_idx`` (R then C), ``wd_norm_c``,
and with ``layouts=True`` the per-slot R ∪ C copies ``w_in``/``wd_rc``. Decode rows read the original
weights by default (no copies: on a GPU with a large model S copies do not fit); ``layouts=True`` trades
``layout_bytes`` per slot for contiguous per-slot GEMVs and refuses to allocate beyond ``layout_budget``.

What a ragged step computes for request q (the oracle in tests/pop_fx/serving): exactly ``reference.pruned``
with ``scope="sequence"``, ``prefill="dense"`` on q alone with its whole prompt in one forward. A chunked
prompt's partition is the importance of the whole prompt (Σh² accumulated over its chunks), not of its last
chunk: docs/spec.md's rule "a multi-token forward on a non-empty cache re-partitions from its own tokens" is for a
new turn, whereas chunks are one prompt cut by the scheduler, and a request's tokens must not depend on how a
scheduler happened to cut it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pop_fx import partition as P
from pop_fx.activations import ACTIVATIONS
from pop_fx.config import PopConfig
from pop_fx.ops import layout
from pop_fx.ops.ragged_prefill import ragged_prefill
from pop_fx.reference import activation_code
from pop_fx.serving.phases import DECODE, LAST, PREFILL
from pop_fx.serving.ragged_decode import ragged_decode
from pop_fx.serving.ragged_decode_layout import ragged_decode_grouped


@dataclass
class StepInfo:
    """The engine's per-step metadata every ragged FFN reads: one entry per token row of the flat batch."""

    slot: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """[T] int64: the persistent request slot of each row (vLLM's request index, SGLang's req_pool_indices)"""
    phase: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """[T] int64: ``pop_fx.serving.phases`` of each row"""
    has_prefill: bool = False
    """some row is not DECODE (known on the host from the scheduler: decode-only steps skip the state write)"""

    order: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """[T] the rows sorted by slot (stable), once per step for every layer's grouped GEMVs (``layouts=True``)"""
    inverse: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """[T] the position of each row in ``order`` (back to the step's row order)"""
    acc: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """[T] bool: rows whose h² adds to their slot's Σh² (PREFILL or LAST; set on steps with a prefill row)"""
    last: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    """[T] bool: LAST rows, whose slot fixes its partition after the step (set on steps with a prefill row)"""

    def set(self, slot: Tensor, phase: Tensor, has_prefill: bool | None = None) -> "StepInfo":
        self.slot = slot.to(torch.long)
        self.phase = phase.to(torch.long)
        self.has_prefill = bool((phase != DECODE).any()) if has_prefill is None else has_prefill
        self.order = torch.argsort(self.slot, stable=True)
        self.inverse = torch.argsort(self.order)
        if self.has_prefill:
            self.last = self.phase == LAST
            self.acc = (self.phase == PREFILL) | self.last
        return self


class RaggedPopFFN(nn.Module):
    """POP for one gated FFN over ragged steps; the wrapped MLP's Parameters are read, never modified."""

    def __init__(self, mlp: nn.Module, config: PopConfig | None = None, *, max_slots: int, step: StepInfo,
                 layouts: bool = False, layout_budget: int | None = None):
        super().__init__()
        config = config or PopConfig()
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"RaggedPopFFN: {type(mlp).__name__} has no nn.Linear {name}: gated FFNs only")
            if name != "down_proj" and lin.bias is not None:
                raise ValueError(f"RaggedPopFFN: {name} has a bias: gated FFNs without gate/up bias only")
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots!r} is invalid: allowed an integer >= 1")
        self.mlp = mlp
        self.step = step
        self.act = activation_code(mlp.act_fn)
        if self.act is None:
            raise ValueError(f"RaggedPopFFN: activation {mlp.act_fn!r} is not one of {list(ACTIVATIONS)}")
        wg, wd = mlp.gate_proj.weight, mlp.down_proj.weight
        d_ff, d_model = wg.shape
        self.sizes = P.partition_sizes(d_ff, config.sparsity, config.candidate_ratio)
        n_rc = self.sizes.n_R + self.sizes.n_C
        self.layout_bytes = (2 * n_rc * d_model + wd.shape[0] * layout.padded(n_rc)) * wg.element_size()
        """bytes of one slot's R ∪ C copies (``layouts=True`` allocates max_slots + 1 of them)"""
        if layouts and layout_budget is not None and (max_slots + 1) * self.layout_bytes > layout_budget:
            raise ValueError(
                f"RaggedPopFFN: per-slot layouts need {(max_slots + 1) * self.layout_bytes} bytes for {max_slots} "
                f"slots, over layout_budget={layout_budget}: use layouts=False (decode reads the original weights)")
        dev = wd.device
        wd_norm = P.down_column_norm(wd).to(dev)
        S = max_slots
        self.register_buffer("wd_norm", wd_norm, persistent=False)
        self.register_buffer("sumsq", torch.zeros(S, d_ff, dtype=torch.float64, device=dev), persistent=False)
        self.register_buffer("rc_idx", torch.zeros(S, n_rc, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("wd_norm_c", torch.zeros(S, self.sizes.n_C, device=dev), persistent=False)
        # One extra slot (index S) holds the data-free partition that reset_slot copies from.
        L = S + 1 if layouts else 0
        self.register_buffer("w_in", torch.zeros((L, 2 * n_rc, d_model) if L else (0,), dtype=wg.dtype, device=dev),
                             persistent=False)
        self.register_buffer("b_in", torch.zeros((L, 2 * n_rc) if L else (0,), dtype=wg.dtype, device=dev),
                             persistent=False)
        self.register_buffer("wd_rc", torch.zeros((L, wd.shape[0], layout.padded(n_rc)) if L else (0,),
                                                  dtype=wd.dtype, device=dev), persistent=False)
        self.layouts = layouts
        with torch.no_grad():
            free = P.weight_only_scores(wd_norm, [wg, mlp.up_proj.weight])
            part = P.split(free, self.sizes)
            self.register_buffer("free_rc", torch.cat([part.R, part.C]).to(dev), persistent=False)
            self.register_buffer("free_wd_norm_c", wd_norm[part.C], persistent=False)
            if layouts:
                self._write_layout(S, self.free_rc)
            for s in range(S):
                self.reset_slot(s)

    @property
    def max_slots(self) -> int:
        return self.sumsq.shape[0]

    def _write_layout(self, s: int, rc: Tensor) -> None:
        m = self.mlp
        layout.write_in_layout(rc, self.sumsq.shape[1], m.gate_proj.weight, None, m.up_proj.weight, None, 0,
                               self.w_in[s], self.b_in[s])
        torch.index_select(m.down_proj.weight, 1, rc, out=self.wd_rc[s, :, : rc.numel()])

    @torch.no_grad()
    def reset_slot(self, s: int) -> None:
        """Slot ``s`` forgets its request: Σh² zero, the data-free partition (docs/spec.md's fallback) until its
        next last chunk. Touches row ``s`` only."""
        self.sumsq[s].zero_()
        self.rc_idx[s].copy_(self.free_rc)
        self.wd_norm_c[s].copy_(self.free_wd_norm_c)
        if self.layouts:
            S = self.max_slots
            self.w_in[s].copy_(self.w_in[S])
            self.wd_rc[s].copy_(self.wd_rc[S])

    @torch.no_grad()
    def export_slot(self, s: int) -> dict[str, Tensor]:
        """Slot ``s``'s POP state (n_R + n_C indices and norms, Σh²): what a preempted request keeps."""
        return {"sumsq": self.sumsq[s].clone(), "rc_idx": self.rc_idx[s].clone(), "wd_norm_c": self.wd_norm_c[s].clone()}

    @torch.no_grad()
    def import_slot(self, s: int, saved: dict[str, Tensor]) -> None:
        """A resumed request's state into (possibly another) slot ``s``; its layout is re-copied from the indices."""
        self.sumsq[s].copy_(saved["sumsq"])
        self.rc_idx[s].copy_(saved["rc_idx"])
        self.wd_norm_c[s].copy_(saved["wd_norm_c"])
        if self.layouts:
            self._write_layout(s, self.rc_idx[s])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        st, m, sz = self.step, self.mlp, self.sizes
        if x2.shape[0] != st.slot.shape[0]:
            raise ValueError(f"RaggedPopFFN: {x2.shape[0]} token rows but the step names {st.slot.shape[0]} slots")
        if self.layouts and not st.has_prefill:
            y = ragged_decode_grouped(x2, st.slot, st.phase, self.w_in, self.wd_rc, self.wd_norm_c, sz.n_R,
                                      sz.n_select, self.act, order=st.order, inverse=st.inverse)
            if m.down_proj.bias is not None:
                y = y + m.down_proj.bias
            return y.reshape(*shape[:-1], y.shape[-1])
        h = m.act_fn(m.gate_proj(x2)) * m.up_proj(x2)
        if st.has_prefill:
            ragged_prefill(h, st.slot, st.acc, st.last, self.wd_norm, self.sumsq, self.rc_idx, self.wd_norm_c,
                           m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, self.w_in, self.b_in,
                           self.wd_rc, sz.n_keep, sz.n_R, sz.n_C)
        # plain torch (fixed shapes): the compiled step fuses the scoring and the mask around one GEMM
        y = ragged_decode(h, st.slot, st.phase, m.down_proj.weight, m.down_proj.bias, self.wd_norm, self.rc_idx,
                          sz.n_R, sz.n_select)
        return y.reshape(*shape[:-1], y.shape[-1])


def mlps(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' MLPs of a Llama/Qwen/Mistral-family causal LM (``model.model.layers[i].mlp``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no .model.layers (Llama/Qwen/Mistral families only)")
    return [layer.mlp for layer in layers]


def wrap_mlps(model: nn.Module, config: PopConfig | None = None, *, max_slots: int, step: StepInfo,
              layouts: bool = False, layout_budget: int | None = None) -> list[RaggedPopFFN]:
    """One ``RaggedPopFFN`` per decoder layer, the model left as it is (an engine calls them itself)."""
    return [RaggedPopFFN(m, config, max_slots=max_slots, step=step, layouts=layouts, layout_budget=layout_budget)
            for m in mlps(model)]


def swap_mlps(model: nn.Module, config: PopConfig | None = None, *, max_slots: int, step: StepInfo,
              layouts: bool = False, layout_budget: int | None = None) -> list[RaggedPopFFN]:
    """Replace every decoder layer's ``mlp`` by its ``RaggedPopFFN`` (``unswap_mlps`` puts them back)."""
    ffns = wrap_mlps(model, config, max_slots=max_slots, step=step, layouts=layouts, layout_budget=layout_budget)
    for layer, f in zip(getattr(model, "model", model).layers, ffns):
        layer.mlp = f
    return ffns


def unswap_mlps(model: nn.Module) -> None:
    for layer in getattr(model, "model", model).layers:
        if isinstance(layer.mlp, RaggedPopFFN):
            layer.mlp = layer.mlp.mlp


def reset_slot(ffns: list[RaggedPopFFN], s: int) -> None:
    for f in ffns:
        f.reset_slot(s)


__all__ = ["RaggedPopFFN", "StepInfo", "mlps", "reset_slot", "swap_mlps", "unswap_mlps", "wrap_mlps"]
