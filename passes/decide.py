"""Decide, per matched site — dense FFNs and routed-experts modules alike — how it is rewritten or why it stays
dense (the reason goes to the report).

=================  ==========================================================================================
action             when
=================  ==========================================================================================
dense              every channel kept (r = 0), or d_ff too small for the sparsity (n_keep < 1)
prefill            a dense site in a prefill graph (more than one token per sequence): ``rewrite_prefill``
decode             a dense site in a decode graph: ``rewrite_decode`` (also under ``candidate_proxy`` for a site
                   the proxy cannot serve — plain or fused FFNs, an unknown activation, a gate it cannot
                   identify — with that reason)
proxy              a decode graph with ``candidate_proxy`` and a gated site it serves: ``rewrite_proxy``
experts_prefill    a routed-experts module in a prefill graph: ``rewrite_experts``
experts_decode     a routed-experts module in a decode graph: ``rewrite_experts``
=================  ==========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from pop_fx.config import PopConfig
from pop_fx.partition import PartitionSizes, partition_sizes

from passes.match_experts import ExpertsMatch
from passes.match_ffn import SiteMatch, proxy_support


@dataclass
class Decision:
    site: SiteMatch | ExpertsMatch
    kind: str
    """the report's kind: the pattern's, "shared_expert" beside routed experts, or "expert\""""
    action: str
    """"dense", "prefill", "decode", "proxy", "experts_prefill" or "experts_decode\""""
    reason: str
    """what the report says: "pop", "pop (… candidates scored exactly)" or "dense: …\""""
    sizes: PartitionSizes
    proxy: tuple[int, int] | None = None
    """for action "proxy": (gate source index, activation code)"""


def decide(m: SiteMatch | ExpertsMatch, kind: str, cfg: PopConfig) -> Decision:
    sizes = partition_sizes(m.d_ff, cfg.sparsity, cfg.candidate_ratio)
    if sizes.is_dense:
        return Decision(m, kind, "dense", "dense: every channel kept (sparsity 0)", sizes)
    if sizes.n_keep < 1:
        return Decision(m, kind, "dense", f"dense: d_ff={m.d_ff} too small for sparsity={cfg.sparsity} (n_keep < 1)",
                        sizes)
    if isinstance(m, ExpertsMatch):
        return Decision(m, kind, "experts_decode" if m.is_decode else "experts_prefill", "pop", sizes)
    if not m.is_decode:
        return Decision(m, kind, "prefill", "pop", sizes)
    if cfg.candidate_proxy is None:
        return Decision(m, kind, "decode", "pop", sizes)
    sup = proxy_support(m)
    if isinstance(sup, str):  # the paper's exact candidate scoring for this site, reported
        return Decision(m, kind, "decode", f"pop ({sup}: candidates scored exactly)", sizes)
    return Decision(m, kind, "proxy", "pop", sizes, sup)


__all__ = ["Decision", "decide"]
