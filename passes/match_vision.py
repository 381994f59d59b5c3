"""Leave a vision tower's FFNs dense: they run only in prefill, so by docs/spec.md they are not sites.

A VLM's vision encoder (Qwen2-VL ``model.visual``) runs once per image in the prefill graph and
never while decoding; POP prunes only FFNs that decode runs. Evidence: the site's module path
lies under a ``visual``/``vision`` module (the same rule as ``pop_fx.sites`` for the eager
reference), so such blocks appear in the prefill graph only and are reported as dense.
"""

from __future__ import annotations

from pop_fx.sites import VISION_REASON, is_vision_path

from passes.match_ffn import SiteMatch, Skipped


def split_vision_tower(sites: list[SiteMatch]) -> tuple[list[SiteMatch], list[Skipped]]:
    """(language-model sites, vision-tower blocks left dense with the reason)."""
    keep, vision = [], []
    for m in sites:
        if is_vision_path(m.path):
            vision.append(Skipped(m.path, VISION_REASON, m.down_weight))
        else:
            keep.append(m)
    return keep, vision


__all__ = ["split_vision_tower"]
