"""One frontier run: measure (or read from the cache) every setting, mark the Pareto front, pick for the
budget; the result as a table, markdown, JSON and a plot."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pop_fx.tools.frontier import measure
from pop_fx.tools.frontier.cache import CACHE_VERSION, Cache, model_fingerprint, runtime_key
from pop_fx.tools.frontier.measure import DENSE_BASELINE, median
from pop_fx.tools.frontier.pareto import pareto_front, recommend
from pop_fx.tools.frontier.settings import DENSE, Budget, Point, Setting


@dataclass
class FrontierResult:
    points: list[Point]
    budget: Budget
    pick: Point | None
    info: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(info=self.info, budget=dataclasses.asdict(self.budget), points=[p.as_dict() for p in self.points],
                    recommended=self.pick.as_dict() if self.pick else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any], budget: Budget | None = None) -> "FrontierResult":
        """A result read back from ``--out``'s frontier.json (optionally under another budget)."""
        names = {f.name for f in dataclasses.fields(Point)} - {"setting"}
        points = [Point(Setting(**p["setting"]), **{k: v for k, v in p.items() if k in names}) for p in d["points"]]
        budget = budget or Budget(**d["budget"])
        for p, on in zip(points, pareto_front(points, budget.metric)):
            p.pareto = on
        return cls(points, budget, recommend(points, budget), d["info"])

    def table(self) -> str:
        head = (f"{'setting':<22} {'r':>5} {'γ':>5} {'ppl':>8} {'×dense':>7} {'agree':>6} {'tok/s':>7} "
                f"{'×dense':>7} {'pareto':>6} {'budget':>6}")
        lines = [head, "-" * len(head)]
        for p in self.points:
            g = "-" if p.setting.gamma is None else f"{p.setting.gamma:g}"
            lines.append(
                f"{p.setting.label:<22} {p.setting.sparsity:>5.2f} {g:>5} {p.perplexity:>8.2f} {p.ppl_ratio:>7.3f} "
                f"{p.agreement:>6.3f} {p.tokens_per_s:>7.1f} {p.speedup:>7.2f} {'*' if p.pareto else '':>6} "
                f"{'in' if self.budget.admits(p) else '':>6}")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| setting | r | γ | perplexity | × dense | agreement | decode tok/s | × dense | Pareto |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for p in self.points:
            g = "–" if p.setting.gamma is None else f"{p.setting.gamma:g}"
            name = f"**{p.setting.method}**" if self.pick is p else p.setting.method
            lines.append(f"| {name} | {p.setting.sparsity:g} | {g} | {p.perplexity:.2f} | {p.ppl_ratio:.3f} | "
                         f"{p.agreement:.3f} | {p.tokens_per_s:.1f} | {p.speedup:.2f} | {'✓' if p.pareto else ''} |")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.pick is None:
            return f"no setting is inside the budget ({self.budget.describe()})"
        p = self.pick
        if p.setting == DENSE:
            return (f"within the budget ({self.budget.describe()}) no measured POP setting decodes faster than dense: "
                    f"keep the dense model (fastest as `pop_fx.compile(model, sparsity=0)`), or loosen --budget")
        return (f"fastest inside the budget ({self.budget.describe()}): {p.setting.label} — {p.speedup:.2f}x dense "
                f"decode speed, perplexity {p.ppl_ratio:.3f}x dense, agreement {p.agreement:.3f}\n"
                f"use it:  {p.setting.code()}")

    def plot(self, path: str | Path) -> Path:
        """PNG: quality (perplexity / dense, log; or agreement) against measured decode speed / dense."""
        from pop_fx.tools.frontier.plot import plot

        return plot(self, path)


def frontier(model, tokenizer, text: str, settings: Sequence[Setting], budget: Budget, *, windows: int,
             prompt_len: int, cont_len: int, batch_size: int, new_tokens: int, rounds: int, prefill: str = "pruned",
             lowering: str = "inductor", cache_dir: Path | None = None, model_name: str = "model",
             text_name: str = "text", progress: bool = True, log: Callable[[str], None] | None = None) -> FrontierResult:
    """Measure every setting's quality and speed (or read them from the cache) and pick one for ``budget``."""
    from tqdm.auto import tqdm

    log = log or (lambda msg: None)
    settings = list(settings)
    if DENSE not in settings:
        settings.insert(0, DENSE)
    threads = torch.get_num_threads()
    info = dict(model=model_name, text_name=text_name, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                windows=windows, prompt_len=prompt_len, cont_len=cont_len, batch_size=batch_size, prefill=prefill,
                new_tokens=new_tokens, rounds=rounds, threads=threads, lowering=lowering,
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""), torch=torch.__version__,
                device=str(next(model.parameters()).device))
    base = dict(version=CACHE_VERSION, model=model_fingerprint(model),
                **{k: info[k] for k in ("text_sha256", "windows", "prompt_len", "cont_len", "batch_size", "dtype",
                                        "torch", "device")})
    cache = Cache(cache_dir, base)
    speed_key = ("speed", list(settings), new_tokens, rounds, threads, lowering, runtime_key(), DENSE_BASELINE)
    speed = cache.get(speed_key)
    n_quality = len(settings)
    total = n_quality + (0 if speed else len(settings) * (1 + rounds))
    bar = tqdm(total=total, desc="frontier", unit="cell", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        def on_cell(s, cached):
            bar.set_description(f"quality {s.label}{' (cached)' if cached else ''}")
            bar.update()

        log(f"quality of {len(settings)} settings: {windows} windows of {prompt_len}+{cont_len} tokens, eager "
            f"reference" + (", cached results reused" if cache_dir else ""))
        quality = measure.measure_quality(model, tokenizer, text, settings, n_windows=windows, prompt_len=prompt_len,
                                  cont_len=cont_len, batch_size=batch_size, prefill=prefill, cache=cache,
                                  on_cell=on_cell)
        if speed is None:
            log(f"speed of {len(settings)} settings: compile each, then {rounds} interleaved rounds of "
                f"{new_tokens} new tokens")

            def on_step(msg):
                bar.set_description(msg)
                if msg.startswith("compiling"):
                    log(msg)
                bar.update()

            measured = measure.measure_speed(model, tokenizer, settings, new_tokens=new_tokens, rounds=rounds,
                                     lowering=lowering, on_step=on_step)
            speed = [measured[s] for s in settings]
            cache.put(speed_key, speed)
        else:
            log("speed: cached result of the same settings reused")
    finally:
        bar.close()
    dense_q = quality[DENSE]
    dense_tps = median(speed[0]["samples"])
    points = []
    for s, sp in zip(settings, speed):
        qd, tps = quality[s], median(sp["samples"])
        points.append(Point(s, qd["perplexity"], qd["perplexity"] / dense_q["perplexity"], qd["agreement"],
                            qd["top1"], tps, tps / dense_tps, list(sp["samples"]), sp["prefill_s"], sp["extra_mib"]))
    for p, on in zip(points, pareto_front(points, budget.metric)):
        p.pareto = on
    return FrontierResult(points, budget, recommend(points, budget), info)


__all__ = ["FrontierResult", "frontier"]
