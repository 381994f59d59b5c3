"""match_vision: FFNs under a vision tower run only in prefill: left dense with the reason, never sites."""

import types

from passes.match_vision import split_vision_tower
from pop_fx.sites import VISION_REASON


def _site(path):
    return types.SimpleNamespace(path=path, down_weight=object())


def test_vision_tower_sites_are_left_dense():
    sites = [_site(p) for p in ("model.visual.blocks.0.mlp", "model.language_model.layers.0.mlp",
                                "vision_tower.encoder.layers.1.mlp")]
    keep, vision = split_vision_tower(sites)
    assert [s.path for s in keep] == ["model.language_model.layers.0.mlp"]
    assert [(s.path, s.reason) for s in vision] == [("model.visual.blocks.0.mlp", VISION_REASON),
                                                    ("vision_tower.encoder.layers.1.mlp", VISION_REASON)]
    assert vision[0].weight is sites[0].down_weight
