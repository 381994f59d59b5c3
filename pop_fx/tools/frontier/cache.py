"""The frontier's result cache: one JSON file per measurement, keyed by the model's weights, the text, the
options and the pop-fx source the measurement depends on, so a rerun (or ``--replot``) measures nothing again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from pop_fx.tools.frontier.settings import Setting

CACHE_VERSION = 1



# What the quality of a setting depends on: the eager reference and the evaluation harness. Speed depends on
# the whole runtime (passes, ops, kernels: runtime_key), which changes far more often.
QUALITY_SOURCES = ("reference.py", "partition.py", "config.py", "sites.py", "activations.py", "lowbit.py",
                   "tools/evaluation/decode.py", "tools/evaluation/harness.py", "tools/evaluation/results.py",
                   "tools/evaluation/text.py")


def quality_source_hash() -> str:
    root = Path(__file__).resolve().parents[2]  # pop_fx/
    h = hashlib.sha256()
    for name in QUALITY_SOURCES:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Config and a sample of every parameter: two different weights never share cached results."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Cache:
    """JSON files under ``root``, one per key; ``base`` (model, text, options, pop-fx source) joins every key."""

    def __init__(self, root: Path | None, base: dict[str, Any]):
        self.root = root
        self.base = base

    def _path(self, key) -> Path:
        blob = json.dumps([self.base, jsonable(key)], sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"

    def get(self, key):
        if self.root is None:
            return None
        p = self._path(key)
        try:
            return json.loads(p.read_text())["value"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key, value) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": jsonable(key), "base": self.base, "value": value}, default=str))
        tmp.replace(p)


def jsonable(x):
    """Settings as dicts, tuples as lists: what a cache key looks like once written as JSON."""
    if isinstance(x, Setting):
        return dataclasses.asdict(x)
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def cache_root() -> Path:
    """``~/.cache/pop-fx/frontier`` (or under ``$POP_FX_CACHE``)."""
    from pop_fx.tools import models

    return models.cache_root() / "frontier"


def runtime_key() -> str:
    """Changes whenever pop-fx's runtime source (passes, ops, kernels) does: the compiled-graph cache's own key
    for the default config, so a cached speed is never read back for other code."""
    from pop_fx.backend import passes_uuid
    from pop_fx.config import PopConfig

    return passes_uuid(PopConfig())[:16]


__all__ = ["CACHE_VERSION", "QUALITY_SOURCES", "Cache", "cache_root", "jsonable", "model_fingerprint",
           "quality_source_hash", "runtime_key"]
