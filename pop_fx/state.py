"""Per-site state shared by a model's prefill and decode graphs.

A site is identified by its down projection's Parameter (docs/spec.md), so the
prefill graph and every decode graph of one model find the same state; two
models, or one model compiled with two configs, never share any. A routed-experts
module's E sites share one state (``ExpertsState``), keyed by its 3-D ``down_proj``. The state's
tensors are allocated once, written in place by the prefill graph and read by
the decode graphs (``pop_fx.ops`` describes them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary  # tensors compare elementwise: key them by identity

from pop_fx.ops import layout
from pop_fx.ops.layout import write_expert_partition
from pop_fx.config import PopConfig
from pop_fx.partition import PartitionSizes, down_column_norm, expert_scores, partition_sizes

STATE_NAMES = ("wd_norm", "rc_idx", "wd_norm_c", "w_in", "b_in", "wd_rc")


@dataclass
class SiteState:
    kind: str
    d_ff: int
    d_model: int
    d_out: int
    sizes: PartitionSizes
    flags: int
    n_in: int
    config: PopConfig
    wd_norm: torch.Tensor
    tensors: dict[str, torch.Tensor]
    graphs: set = field(default_factory=set)
    """which graph kinds ("prefill", "decode") rewrote this site"""
    info: dict = field(default_factory=dict)
    """pattern, activation and module path, for reports"""
    weights: dict = field(default_factory=dict, repr=False)
    """the site's real weights (w_a, b_a, w_b, b_b, wd): the data-free partition is computed from them"""
    proxy: dict = field(default_factory=dict)
    """candidate_proxy: the int8 copy {"q": [gate; up] rows, "s": their scales}, made once from the weights;
    "int8-values" adds "wd_t", the down weight's channel-major copy [d_ff, d_out]"""
    stale: bool = False
    """``reset`` ran and no prefill has written a partition since: a decode step first writes the data-free one"""

    def ensure_proxy(self, gate: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
        """The site's proxy tables (``pop_fx.lowbit.proxy_tables``), created on first use; constant afterwards."""
        from pop_fx.lowbit import VALUES, down_channel_major, proxy_tables

        with _lock:
            if not self.proxy:
                q, s = proxy_tables(gate, up, self.config.candidate_proxy)
                self.proxy.update(q=q, s=s)
                if self.config.candidate_proxy == VALUES:
                    self.proxy.update(wd_t=down_channel_major(self.weights["wd"]))
        return self.proxy

    def initialize(self) -> None:
        """Write the data-free partition (docs/spec.md's fallback: ||Wd[:, j]|| · Π ||W_in[j, :]||) into the state.

        Used before any prefill and after ``reset``: a decode step that has no prefill of its own (a one-token
        prompt) prunes by weight norms, never by a previous request's partition or by an all-zero layout.
        """
        from pop_fx.partition import weight_only_scores

        w = self.weights
        rows = layout.weight_rows(w["w_a"], self.flags)
        ins = [rows[: self.d_ff], rows[self.d_ff:]] if self.flags & layout.FUSED else [rows]
        if w.get("w_b") is not None:
            ins.append(layout.weight_rows(w["w_b"], self.flags))
        scores = weight_only_scores(self.wd_norm, ins)
        if self.config.scope == "sequence":
            scores = scores.expand(self.tensors["rc_idx"].shape[0], -1)
        t = self.tensors
        with torch.no_grad():
            layout.write_partition(scores, self.sizes, w["wd"], w["w_a"], w.get("b_a"), w.get("w_b"), w.get("b_b"),
                                self.wd_norm, t["rc_idx"], t["wd_norm_c"], t["w_in"], t["b_in"], t["wd_rc"], self.flags)

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *self.proxy.values()])


_lock = threading.Lock()
# down Parameter -> {PopConfig: SiteState}; weak so that a deleted model frees its state.
# down Parameter -> {(PopConfig, dtype, device): state}. model.to() keeps the Parameter objects and changes their
# data, so a state belongs to the weights' dtype and device too: graphs of each dtype read their own layouts.
_STATES: "WeakIdKeyDictionary[torch.Tensor, dict[tuple, SiteState | ExpertsState]]" = WeakIdKeyDictionary()
# any weight Parameter -> (site kind or None, reason) for the report
_NOTES: "WeakIdKeyDictionary[torch.Tensor, dict[PopConfig, dict[tuple[str, str], dict]]]" = WeakIdKeyDictionary()


def get_or_create(down_weight: torch.Tensor, config: PopConfig, *, kind: str, d_ff: int, d_model: int,
                  flags: int, n_in: int, in_dtype: torch.dtype, weights: dict, layouts: bool = True) -> SiteState:
    """``layouts=False``: no R ∪ C layout buffers (``w_in``/``wd_rc`` empty, so no prefill copies them): a site
    whose decode op reads the original weights or a copy made once (``candidate_proxy="int8-values"``)."""
    with _lock:
        per_cfg = _STATES.setdefault(down_weight, {})
        key = (config, down_weight.dtype, down_weight.device)
        st = per_cfg.get(key)
        if st is not None:
            return st
        sizes = partition_sizes(d_ff, config.sparsity, config.candidate_ratio)
        dev = down_weight.device
        wd_norm = down_column_norm(down_weight, 0 if flags & layout.CONV1D else -1).to(dev)
        d_out = down_weight.shape[1] if flags & layout.CONV1D else down_weight.shape[0]
        n_rc = sizes.n_R + sizes.n_C
        S = config.max_batch_size if config.scope == "sequence" else 1
        batch = config.scope == "batch" and layouts
        tensors = {
            "wd_norm": wd_norm,
            "rc_idx": torch.zeros(S, n_rc, dtype=torch.long, device=dev),
            "wd_norm_c": torch.zeros(S, sizes.n_C, dtype=torch.float32, device=dev),
            # Compact layouts only under scope="batch": per-sequence copies would multiply FFN memory by the batch.
            "w_in": torch.zeros((n_in * n_rc, d_model) if batch else (0,), dtype=in_dtype, device=dev),
            "b_in": torch.zeros((n_in * n_rc,) if batch else (0,), dtype=in_dtype, device=dev),
            "wd_rc": torch.zeros((d_out, layout.padded(n_rc)) if batch else (0,), dtype=down_weight.dtype, device=dev),
        }
        st = SiteState(kind, d_ff, d_model, d_out, sizes, flags, n_in, config, wd_norm, tensors,
                       weights={**weights, "wd": down_weight})
        st.initialize()
        per_cfg[key] = st
        return st


# ----------------------------------------------------------------------------------------------
# routed experts: one state per experts module, E sites (expert e = its down_proj Parameter plus e)
# ----------------------------------------------------------------------------------------------

EXPERT_STATE_NAMES = ("wd_norm", "rc_idx", "wd_norm_c", "dense", "w_in", "wd_rc")


@dataclass
class ExpertsState:
    num_experts: int
    d_ff: int
    d_model: int
    sizes: PartitionSizes
    config: PopConfig
    tensors: dict[str, torch.Tensor]
    weights: dict = field(repr=False)
    """the real gate_up_proj and down_proj Parameters"""
    graphs: set = field(default_factory=set)
    info: dict = field(default_factory=dict)
    kind: str = "expert"
    stale: bool = False
    """``reset`` ran and no prefill has written a partition since (see ``SiteState.stale``)"""

    def initialize(self) -> None:
        """Every expert back to the data-free partition (or dense, per ``empty_expert``) until the next prefill."""
        t, gu, dn = self.tensors, self.weights["gate_up"], self.weights["down"]
        G = t["rc_idx"].shape[1]
        empty_dense = self.config.empty_expert == "dense"
        rows = torch.zeros(0, dtype=torch.bool, device=dn.device)
        with torch.no_grad():
            for e in range(self.num_experts):
                s = expert_scores(rows.new_zeros((0, self.d_ff)), rows, t["wd_norm"][e], gu[e], empty_dense)
                dense = torch.full((G,), s is None, dtype=torch.bool, device=dn.device)
                s = torch.zeros_like(t["wd_norm"][e]) if s is None else s
                write_expert_partition(e, s.expand(G, -1), dense, self.sizes, gu, dn, t["wd_norm"],
                                                  t["rc_idx"], t["wd_norm_c"], t["dense"], t["w_in"], t["wd_rc"])

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def report_sites(self) -> list[tuple[str, str]]:
        """(path, kind) of each expert: one report row per expert."""
        return [(f"{self.info.get('path', 'experts')}.{e}", "expert") for e in range(self.num_experts)]


def get_or_create_experts(gate_up: torch.Tensor, down: torch.Tensor, config: PopConfig) -> ExpertsState:
    """The state of one routed-experts module (E expert sites), keyed by its ``down_proj`` Parameter [E, H, I]."""
    with _lock:
        per_cfg = _STATES.setdefault(down, {})
        key = (config, down.dtype, down.device)
        st = per_cfg.get(key)
        if st is not None:
            return st
        E, H, d_ff = down.shape
        sizes = partition_sizes(d_ff, config.sparsity, config.candidate_ratio)
        n_rc = sizes.n_R + sizes.n_C
        G = config.max_batch_size if config.scope == "sequence" else 1
        batch = config.scope == "batch"
        dev = down.device
        tensors = {
            "wd_norm": down_column_norm(down, -1).to(dev),
            "rc_idx": torch.zeros(E, G, n_rc, dtype=torch.long, device=dev),
            "wd_norm_c": torch.zeros(E, G, sizes.n_C, dtype=torch.float32, device=dev),
            "dense": torch.zeros(E, G, dtype=torch.bool, device=dev),
            # Compact layouts only under scope="batch": per-sequence copies would multiply expert memory by the batch.
            "w_in": torch.zeros((E, 2 * n_rc, H) if batch else (0,), dtype=gate_up.dtype, device=dev),
            "wd_rc": torch.zeros((E, H, layout.padded(n_rc)) if batch else (0,), dtype=down.dtype, device=dev),
        }
        st = ExpertsState(E, d_ff, H, sizes, config, tensors, weights={"gate_up": gate_up, "down": down})
        st.initialize()
        per_cfg[key] = st
        return st


def note(weight: torch.Tensor, config: PopConfig, kind: str | None, reason: str, *, path: str = "",
         matched: bool = False, graph: str = "prefill") -> None:
    """Record what one graph (``graph``: "prefill" or "decode") did with the FFN-like block whose down weight is
    ``weight``. Every distinct (graph, reason) is kept, so the report can tell a block POP pruned in one graph
    from one it pruned everywhere."""
    with _lock:
        _NOTES.setdefault(weight, {}).setdefault(config, {})[(graph, reason)] = {
            "kind": kind, "reason": reason, "path": path, "matched": matched, "graph": graph}


def states_of(param: torch.Tensor) -> dict[PopConfig, SiteState]:
    """Per config, the state of ``param`` for its current dtype and device (what its graphs read now)."""
    return {c: st for (c, dtype, device), st in _STATES.get(param, {}).items()
            if dtype == param.dtype and device == param.device}


def all_states_of(param: torch.Tensor) -> list[SiteState]:
    """Every state of ``param``: one per (config, dtype, device) it was compiled with."""
    return list(_STATES.get(param, {}).values())


def notes_of(param: torch.Tensor) -> dict[PopConfig, list[dict]]:
    """Per config, what each graph did with this block (one entry per distinct graph kind and reason)."""
    return {c: list(v.values()) for c, v in _NOTES.get(param, {}).items()}


def reset(model: torch.nn.Module) -> None:
    """Forget every partition of ``model``: the next prefill writes a new one; a decode step that comes first
    (its prefill ran uncompiled, say) prunes with the data-free partition. Costs nothing until then: the
    partitions are only marked, so a new request pays no pass over the weights before its prefill."""
    with _lock:
        for p in model.parameters():
            for st in _STATES.get(p, {}).values():
                st.stale = True


def before_graph(states: list, phase: str) -> None:
    """Called by the backend before each call of a rewritten graph with the states it reads or writes."""
    for st in states:
        if st.stale:
            if phase == "decode":
                with _lock:
                    if st.stale:
                        st.initialize()
            st.stale = False
