"""Name shared experts: a gated FFN beside routed experts (Qwen2-MoE ``shared_expert``, DeepSeek
``shared_experts``) is a site of kind ``shared_expert`` (docs/spec.md's sites table); the rewrite is the dense
sites' one, only the report's kind differs.
"""

from __future__ import annotations

from passes.match_ffn import SiteMatch


def block_of(path: str) -> str:
    """The block a module sits in: its parent path ("model.layers.0.mlp" for "model.layers.0.mlp.experts")."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def name_shared_experts(sites: list[SiteMatch], experts: list) -> list[str]:
    """Each dense site's report kind: "shared_expert" for a gated FFN beside routed experts, else its pattern's kind.

    Evidence: the site's module path names a shared expert (Qwen2-MoE ``shared_expert``, DeepSeek
    ``shared_experts``), or it sits in the same block as a routed-experts module of this graph
    (``experts``: ExpertsMatch or Skipped entries, each with the experts module's path).
    """
    blocks = {block_of(e.path) for e in experts}
    out = []
    for m in sites:
        shared = m.kind in ("gated", "fused_gated") and ("shared_expert" in m.path or block_of(m.path) in blocks)
        out.append("shared_expert" if shared else m.kind)
    return out


__all__ = ["block_of", "name_shared_experts"]
