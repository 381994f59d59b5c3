"""What ``pop-fx frontier`` measures: settings (a method at a sparsity), measured points, the quality budget,
and the two presets (``--quick`` and the default sweep)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

QUICK = dict(
    # The int8-values method (one op per site, no layouts) at two sparsities; not the int8/int3 proxies: their
    # CPU decode is slower than dense (docs/benchmarks.md, "Proxy-scored candidates"), and their eager warm-up
    # alone is too slow for a quick run.
    settings="static@0.2,pop-0.1@0.3,pop-0.1@0.5,full@0.5,proxy-values-2@0.5,proxy-values-2@0.6",
    windows=16, prompt_len=64, cont_len=48, new_tokens=24, rounds=3,
)
DEFAULT = dict(
    sparsities=(0.2, 0.3, 0.4, 0.5), methods=("static", "pop-0.1", "pop-0.2", "full"),
    windows=32, prompt_len=128, cont_len=128, new_tokens=32, rounds=5,
)


@dataclass(frozen=True)
class Setting:
    """One operating point to measure: a method of ``pop-fx eval`` at a sparsity."""

    method: str
    """dense, static, pop-<γ>, full, proxy-<γ>, proxy-int3-<γ>, proxy-gate-<γ>"""
    sparsity: float
    gamma: float | None = None
    """PopConfig.candidate_ratio (None for dense)"""
    proxy: str | None = None
    """PopConfig.candidate_proxy"""

    @property
    def label(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method} r={self.sparsity:g}"

    def config(self, **fields):
        from pop_fx.config import PopConfig

        if self.method == "dense":  # compiled as POP with nothing pruned: the same lowering as every setting
            return PopConfig(sparsity=0.0, **fields)
        return PopConfig(sparsity=self.sparsity, candidate_ratio=self.gamma, candidate_proxy=self.proxy, **fields)

    def code(self) -> str:
        """The one line that uses this setting."""
        if self.method == "dense":
            return "pop_fx.compile(model, sparsity=0)  # dense, with pop-fx's autotuned decode linears"
        extra = f", candidate_proxy={self.proxy!r}" if self.proxy else ""
        return f"pop_fx.compile(model, sparsity={self.sparsity:g}, candidate_ratio={self.gamma:g}{extra})"


DENSE = Setting("dense", 0.0)


def parse_settings(spec: str | None, methods: Iterable[str] = (), sparsities: Iterable[float] = ()) -> list[Setting]:
    """Dense first, then ``spec``'s ``method@r`` items, or else every method at every sparsity."""
    from pop_fx.config import PopConfig
    from pop_fx.tools.evaluation.methods import parse_methods

    pairs: list[tuple[str, float]] = []
    if spec:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, at, r = item.partition("@")
            try:
                pairs.append((name, float(r)))
            except ValueError:
                raise ValueError(f"setting {item!r} is invalid: allowed method@sparsity, e.g. pop-0.1@0.3") from None
            if not at:
                raise ValueError(f"setting {item!r} is invalid: allowed method@sparsity, e.g. pop-0.1@0.3")
    else:
        pairs = [(m, float(r)) for r in sparsities for m in methods]
    out = [DENSE]
    for name, r in pairs:
        found = [m for m in parse_methods([name], gammas=(0.1,)) if m.kind != "dense"]
        for m in found:
            if m.kind != "pop":
                raise ValueError(f"method {name!r} is invalid here: allowed static, pop-<γ>, full and the proxy "
                                 f"methods (a fixed-mask baseline has no compiled speed)")
            s = Setting(m.name, PopConfig(sparsity=r).sparsity, m.gamma, m.proxy)
            if s not in out:
                out.append(s)
    if len(out) < 2:
        raise ValueError("no setting to measure: allowed --settings method@r,... or --methods with --sparsities")
    return out


@dataclass
class Point:
    setting: Setting
    perplexity: float
    ppl_ratio: float
    """continuation perplexity / dense's (decode mode)"""
    agreement: float
    """fraction of decode steps whose argmax equals dense's (teacher-forced)"""
    top1: float
    tokens_per_s: float
    """median decode tokens/s over the interleaved rounds"""
    speedup: float
    """tokens_per_s / dense's, same process and rounds"""
    samples: list[float] = field(default_factory=list)
    prefill_s: float = float("nan")
    extra_mib: float = 0.0
    pareto: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(label=self.setting.label, code=self.setting.code())
        return d


@dataclass(frozen=True)
class Budget:
    """A quality floor: perplexity at most ``value`` × dense's, or next-token agreement at least ``value``."""

    metric: str
    """"ppl" (perplexity ratio to dense, lower is better) or "agreement" (higher is better)"""
    value: float

    def admits(self, p: Point) -> bool:
        if self.metric == "ppl":
            return p.ppl_ratio <= self.value
        return p.agreement >= self.value

    def describe(self) -> str:
        return (f"perplexity <= {self.value:g} x dense" if self.metric == "ppl"
                else f"next-token agreement with dense >= {self.value:g}")


def parse_budget(text: str) -> Budget:
    """``1.10`` or ``ppl:1.10`` (max perplexity ratio), ``0.9`` or ``agreement:0.9`` (min agreement)."""
    raw = str(text).strip().lower()
    metric, _, num = raw.rpartition(":")
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if metric == "":
        metric = "ppl" if value >= 1 else "agreement"
    if metric not in ("ppl", "agreement") or not math.isfinite(value) or value <= 0 \
            or (metric == "ppl" and value < 1) or (metric == "agreement" and value > 1):
        raise ValueError(f"--budget={text!r} is invalid: allowed a perplexity ratio >= 1 (e.g. 1.10 or ppl:1.10) "
                         f"or an agreement in (0, 1] (e.g. 0.9 or agreement:0.9)")
    return Budget(metric, value)



__all__ = ["DEFAULT", "DENSE", "QUICK", "Budget", "Point", "Setting", "parse_budget", "parse_settings"]
