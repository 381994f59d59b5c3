"""State of one routed-experts module (E expert sites) shared by its prefill and decode graphs.

Keyed like every site's state (``pop_fx.state``): by the module's ``down_proj`` Parameter
[E, H, I] and the config; each expert e is a site of its own, identified by that Parameter
plus e. The tensors are described in ``pop_fx.ops.experts_prefill``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pop_fx.ops.layout import write_expert_partition
from pop_fx import state as _state
from pop_fx.config import PopConfig
from pop_fx.partition import PartitionSizes, down_column_norm, expert_scores, partition_sizes

EXPERT_STATE_NAMES = ("wd_norm", "rc_idx", "wd_norm_c", "dense", "w_in", "wd_t")


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
                                                  t["rc_idx"], t["wd_norm_c"], t["dense"], t["w_in"], t["wd_t"])

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def report_sites(self) -> list[tuple[str, str]]:
        """(path, kind) of each expert: one report row per expert."""
        return [(f"{self.info.get('path', 'experts')}.{e}", "expert") for e in range(self.num_experts)]


def get_or_create(gate_up: torch.Tensor, down: torch.Tensor, config: PopConfig) -> ExpertsState:
    with _state._lock:
        per_cfg = _state._STATES.setdefault(down, {})
        st = per_cfg.get(config)
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
            "wd_t": torch.zeros((E, n_rc, H) if batch else (0,), dtype=down.dtype, device=dev),
        }
        st = ExpertsState(E, d_ff, H, sizes, config, tensors, weights={"gate_up": gate_up, "down": down})
        st.initialize()
        per_cfg[config] = st
        return st


__all__ = ["EXPERT_STATE_NAMES", "ExpertsState", "get_or_create"]
