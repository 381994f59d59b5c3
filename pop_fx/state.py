"""Per-site state, found from the weights a compiled graph is called with.

A site is identified by its down projection's weight (docs/spec.md): the prefill graph and every decode graph
of one model find the same state from the same weight, and two models, or one model compiled with two configs,
never share any. A routed-experts module's E sites share one state (``ExpertsState``), keyed by its 3-D
``down_proj``. The state's tensors are allocated once, written in place by the prefill graph and read by the
decode graphs (``pop_fx.ops`` describes them).

A state never holds its weights: Dynamo reuses one compiled graph for every module instance whose code and
guards match (two models of one class, a deepcopy, every layer of a model), so the weights come from each call
(``pop_fx.binding``), which also says when they changed in place (``stamp``) and the state must be refreshed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary  # tensors compare elementwise: key them by identity

from pop_fx.config import PopConfig
from pop_fx.ops import layout
from pop_fx.ops.layout import write_expert_partition
from pop_fx.partition import PartitionSizes, down_column_norm, expert_scores, partition_sizes, weight_only_scores

STATE_NAMES = ("wd_norm", "rc_idx", "wd_norm_c", "w_in", "b_in", "wd_rc")
EXPERT_STATE_NAMES = ("wd_norm", "rc_idx", "wd_norm_c", "dense", "w_in", "wd_rc")
PROXY_NAMES = ("q", "s")
VALUES_NAMES = ("q", "s", "wd_t")

Weights = dict  # name -> Tensor | None: w_a, b_a, w_b, b_b, wd (a dense site) or gate_up, down (routed experts)


def stamp(weights: Iterable[torch.Tensor | None]) -> tuple:
    """What changes when a weight is written in place (``_version``: load_state_dict, an optimizer step) or given
    new storage (``p.data = ...``): a state derived from weights with another stamp is stale."""
    return tuple(None if w is None else (w._version, w.data_ptr()) for w in weights)


@dataclass(frozen=True)
class SiteSpec:
    """What a compiled graph knows of a dense site, whatever instance it runs for: enough to make its state."""

    kind: str
    d_ff: int
    d_model: int
    flags: int
    n_in: int
    layouts: bool = True
    """False: no R ∪ C layout buffers (a decode op that reads the original weights, e.g. int8-values)"""
    gate: int | None = None
    """candidate_proxy: which of (w_a, w_b) is the gate (None: the site has no proxy copy)"""


@dataclass
class SiteState:
    spec: SiteSpec
    sizes: PartitionSizes
    d_out: int
    config: PopConfig
    wd_norm: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stamps: tuple = ()
    """``stamp`` of the weights the state was derived from"""
    graphs: set = field(default_factory=set)
    """which graph kinds ("prefill", "decode") rewrote this site"""
    info: dict = field(default_factory=dict)
    """pattern, activation and module path, for reports"""
    proxy: dict = field(default_factory=dict)
    """candidate_proxy: the int8 copy {"q": [gate; up] rows, "s": their scales}, made once from the weights;
    "int8-values" adds "wd_t", the down weight's channel-major copy [d_ff, d_out]"""
    stale: bool = False
    """``reset`` ran (or the weights changed) and no prefill has written a partition since: a decode step first
    writes the data-free one"""

    kind = property(lambda self: self.spec.kind)
    d_ff = property(lambda self: self.spec.d_ff)
    d_model = property(lambda self: self.spec.d_model)
    flags = property(lambda self: self.spec.flags)
    n_in = property(lambda self: self.spec.n_in)

    @staticmethod
    def weight_names() -> tuple[str, ...]:
        return ("w_a", "b_a", "w_b", "b_b", "wd")

    def initialize(self, w: Weights) -> None:
        """Write the data-free partition (docs/spec.md's fallback: ||Wd[:, j]|| · Π ||W_in[j, :]||) into the state.

        Used before any prefill and after ``reset``: a decode step that has no prefill of its own (a one-token
        prompt) prunes by weight norms, never by a previous request's partition or by an all-zero layout.
        """
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
                                   self.wd_norm, t["rc_idx"], t["wd_norm_c"], t["w_in"], t["b_in"], t["wd_rc"],
                                   self.flags)

    def proxy_tables(self, w: Weights) -> dict[str, torch.Tensor]:
        """The site's proxy tables (``pop_fx.lowbit.proxy_tables``), made from the weights on first use."""
        from pop_fx.lowbit import VALUES, down_channel_major, proxy_tables

        gate, up = (w["w_a"], w["w_b"]) if self.spec.gate == 0 else (w["w_b"], w["w_a"])
        q, s = proxy_tables(gate, up, self.config.candidate_proxy)
        new = dict(q=q, s=s)
        if self.config.candidate_proxy == VALUES:
            new.update(wd_t=down_channel_major(w["wd"]))
        if self.proxy:  # refreshed in place: graphs already bound hold these tensors
            for k, v in new.items():
                self.proxy[k].copy_(v)
        else:
            self.proxy.update(new)
        return self.proxy

    def sync(self, w: Weights) -> None:
        """Refresh what the state derived from weights that have changed since (norms, proxy copies); the
        partition then starts again from the data-free one, as after ``reset``."""
        s = stamp(w.get(k) for k in self.weight_names())
        if s == self.stamps:
            return
        with torch.no_grad():
            self.wd_norm.copy_(down_column_norm(w["wd"], 0 if self.flags & layout.CONV1D else -1))
            if self.proxy:
                self.proxy_tables(w)
        self.stamps = s
        self.stale = True

    def tensors_for(self, names: tuple[str, ...], w: Weights) -> list[torch.Tensor]:
        """The state tensors a graph's placeholders ``names`` stand for (proxy tables made on first use)."""
        if any(n in PROXY_NAMES + VALUES_NAMES for n in names) and not self.proxy:
            self.proxy_tables(w)
        return [self.tensors[n] if n in self.tensors else self.proxy[n] for n in names]

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *self.proxy.values()])


_lock = threading.RLock()
# down weight -> {(PopConfig, dtype, device): state}. model.to() keeps the Parameter objects and changes their data,
# so a state belongs to the weights' dtype and device too: graphs of each dtype read their own layouts. Weak: a
# deleted model frees its state (no state holds a weight).
_STATES: "WeakIdKeyDictionary[torch.Tensor, dict[tuple, State]]" = WeakIdKeyDictionary()
# any weight Parameter -> {PopConfig: {(graph, reason): note}} for the report
_NOTES: "WeakIdKeyDictionary[torch.Tensor, dict[PopConfig, dict[tuple[str, str], dict]]]" = WeakIdKeyDictionary()


def get_or_create(spec: SiteSpec, config: PopConfig, w: Weights) -> SiteState:
    """The state of the dense site whose weights are ``w`` (created on first sight, refreshed if they changed)."""
    down_weight = w["wd"]
    with _lock:
        per_cfg = _STATES.setdefault(down_weight, {})
        key = (config, down_weight.dtype, down_weight.device)
        st = per_cfg.get(key)
        if st is None:
            st = per_cfg[key] = _new_site(spec, config, w)
        else:
            st.sync(w)
        return st


def _new_site(spec: SiteSpec, config: PopConfig, w: Weights) -> SiteState:
    down_weight, flags = w["wd"], spec.flags
    sizes = partition_sizes(spec.d_ff, config.sparsity, config.candidate_ratio)
    dev = down_weight.device
    in_dtype = w["w_a"].dtype
    wd_norm = down_column_norm(down_weight, 0 if flags & layout.CONV1D else -1).to(dev)
    d_out = down_weight.shape[1] if flags & layout.CONV1D else down_weight.shape[0]
    n_rc = sizes.n_R + sizes.n_C
    S = config.max_batch_size if config.scope == "sequence" else 1
    batch = config.scope == "batch" and spec.layouts
    tensors = {
        "wd_norm": wd_norm,
        "rc_idx": torch.zeros(S, n_rc, dtype=torch.long, device=dev),
        "wd_norm_c": torch.zeros(S, sizes.n_C, dtype=torch.float32, device=dev),
        # Compact layouts only under scope="batch": per-sequence copies would multiply FFN memory by the batch.
        "w_in": torch.zeros((spec.n_in * n_rc, spec.d_model) if batch else (0,), dtype=in_dtype, device=dev),
        "b_in": torch.zeros((spec.n_in * n_rc,) if batch else (0,), dtype=in_dtype, device=dev),
        "wd_rc": torch.zeros((d_out, layout.padded(n_rc)) if batch else (0,), dtype=down_weight.dtype, device=dev),
    }
    # Stale until written: a prefill writes the partition; a decode step that comes first writes the data-free one
    # (pop_fx.binding), so the common path (prefill first) pays no pass over the weights here.
    return SiteState(spec, sizes, d_out, config, wd_norm, tensors,
                     stamps=stamp(w.get(k) for k in SiteState.weight_names()), stale=True)


# ----------------------------------------------------------------------------------------------
# routed experts: one state per experts module, E sites (expert e = its down_proj Parameter plus e)
# ----------------------------------------------------------------------------------------------


@dataclass
class ExpertsState:
    num_experts: int
    d_ff: int
    d_model: int
    sizes: PartitionSizes
    config: PopConfig
    tensors: dict[str, torch.Tensor]
    stamps: tuple = ()
    graphs: set = field(default_factory=set)
    info: dict = field(default_factory=dict)
    kind: str = "expert"
    stale: bool = False
    """``reset`` ran (or the weights changed) and no prefill has written a partition since (``SiteState.stale``)"""

    @staticmethod
    def weight_names() -> tuple[str, ...]:
        return ("gate_up", "down")

    def initialize(self, w: Weights) -> None:
        """Every expert back to the data-free partition (or dense, per ``empty_expert``) until the next prefill."""
        t, gu, dn = self.tensors, w["gate_up"], w["down"]
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

    def sync(self, w: Weights) -> None:
        s = stamp(w.get(k) for k in self.weight_names())
        if s == self.stamps:
            return
        with torch.no_grad():
            self.tensors["wd_norm"].copy_(down_column_norm(w["down"], -1))
        self.stamps = s
        self.stale = True

    def tensors_for(self, names: tuple[str, ...], w: Weights) -> list[torch.Tensor]:
        return [self.tensors[n] for n in names]

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def report_sites(self) -> list[tuple[str, str]]:
        """(path, kind) of each expert: one report row per expert."""
        return [(f"{self.info.get('path', 'experts')}.{e}", "expert") for e in range(self.num_experts)]


def get_or_create_experts(config: PopConfig, w: Weights) -> ExpertsState:
    """The state of one routed-experts module (E expert sites), keyed by its ``down_proj`` [E, H, I]."""
    gate_up, down = w["gate_up"], w["down"]
    with _lock:
        per_cfg = _STATES.setdefault(down, {})
        key = (config, down.dtype, down.device)
        st = per_cfg.get(key)
        if st is not None:
            st.sync(w)
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
        st = ExpertsState(E, d_ff, H, sizes, config, tensors, stamps=stamp((gate_up, down)), stale=True)
        per_cfg[key] = st
        return st


State = Union[SiteState, ExpertsState]


def note(weight: torch.Tensor, config: PopConfig, kind: str | None, reason: str, *, path: str = "",
         matched: bool = False, graph: str = "prefill") -> None:
    """Record what one graph (``graph``: "prefill" or "decode") did with the FFN-like block whose down weight is
    ``weight``. Every distinct (graph, reason) is kept, so the report can tell a block POP pruned in one graph
    from one it pruned everywhere."""
    with _lock:
        _NOTES.setdefault(weight, {}).setdefault(config, {})[(graph, reason)] = {
            "kind": kind, "reason": reason, "path": path, "matched": matched, "graph": graph}


def states_of(param: torch.Tensor) -> dict[PopConfig, State]:
    """Per config, the state of ``param`` for its current dtype and device (what its graphs read now)."""
    return {c: st for (c, dtype, device), st in _STATES.get(param, {}).items()
            if dtype == param.dtype and device == param.device}


def all_states_of(param: torch.Tensor) -> list[State]:
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
