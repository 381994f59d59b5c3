"""Results of one evaluation: a row per (method, r), their table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pop_fx.tools.evaluation.decode import RowOutputs


@dataclass
class MethodResult:
    method: str
    gamma: float | None
    sparsity: float
    perplexity: float
    top1: float
    agreement: float
    """fraction of teacher-forced steps whose argmax equals dense's"""
    greedy_match: float
    """fraction of greedy positions whose token equals dense's greedy token"""
    greedy_prefix: float
    """mean number of greedy tokens before the first difference from dense"""
    n_tokens: int
    seconds: float
    backend: str = "reference"


@dataclass
class EvalResult:
    rows: list[MethodResult]
    settings: dict[str, Any]
    windows: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    agreement_check: dict[str, Any] | None = None
    text: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str, sparsity: float | None = None) -> MethodResult:
        for r in self.rows:
            if r.method == method and (sparsity is None or math.isclose(r.sparsity, sparsity)):
                return r
        raise KeyError((method, sparsity))

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "text": self.text,
            "windows": self.windows,
            "calibration": self.calibration,
            "results": [dataclasses.asdict(r) for r in self.rows],
            "agreement_check": self.agreement_check,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = [f.name for f in dataclasses.fields(MethodResult)]
        w = csv.DictWriter(buf, fieldnames=names)
        w.writeheader()
        for r in self.rows:
            w.writerow(dataclasses.asdict(r))
        return buf.getvalue()

    def table(self) -> str:
        head = f"{'method':<10} {'r':>5} {'ppl':>10} {'top1':>7} {'agree':>7} {'greedy':>7} {'prefix':>7} {'sec':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.method:<10} {r.sparsity:>5.2f} {r.perplexity:>10.3f} {r.top1:>7.4f} {r.agreement:>7.4f} "
                f"{r.greedy_match:>7.4f} {r.greedy_prefix:>7.2f} {r.seconds:>8.1f}"
            )
        s = self.settings
        lines.append(
            f"{s['n_windows']} windows of {s['prompt_len']} prompt + {s['cont_len']} continuation tokens "
            f"(text characters [0, {self.text.get('calibration_split')})), batch {s['batch_size']}, {s['scope_note']}; "
            f"greedy generation on the first {s.get('greedy_windows', s['n_windows'])} windows"
        )
        if self.calibration:
            lines.append(
                f"wanda-sp calibrated on {len(self.calibration)} windows of {s['prompt_len'] + s['cont_len']} tokens from "
                f"characters [{self.text.get('calibration_split')}, {self.text.get('chars')}), disjoint from the eval windows"
            )
        if self.agreement_check is not None:
            lines.append(f"backend agreement check: {json.dumps(self.agreement_check)}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: perplexity against sparsity, one line per method; dense as a dashed line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        dense = [r for r in self.rows if r.method == "dense"]
        methods = [m for m in dict.fromkeys(r.method for r in self.rows) if m != "dense"]
        for m in methods:
            pts = sorted((r.sparsity, r.perplexity) for r in self.rows if r.method == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if dense:
            ax.axhline(dense[0].perplexity, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("FFN sparsity r")
        ax.set_ylabel("continuation perplexity (decode mode)")
        s = self.settings
        ax.set_title(f"{s.get('model', 'model')}: {s['n_windows']} windows, {s['prompt_len']}+{s['cont_len']} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
        files["csv"].write_text(self.to_csv())
        files["json"].write_text(self.to_json())
        self.plot(files["png"])
        return files


def metrics(out: RowOutputs, greedy: torch.Tensor, conts: torch.Tensor, dense: tuple[torch.Tensor, torch.Tensor] | None):
    dense_pred, dense_greedy = dense if dense is not None else (out.pred, greedy)
    same = greedy == dense_greedy
    T = conts.shape[1]
    first_diff = torch.where(same.all(1), torch.full((same.shape[0],), T), (~same).int().argmax(1))
    if same.numel() == 0:  # no greedy windows
        same, first_diff = torch.full((1,), float("nan")), torch.full((1,), float("nan"))
    return {
        "perplexity": math.exp(out.nll.mean().item()),
        "top1": (out.pred == conts).double().mean().item(),
        "agreement": (out.pred == dense_pred).double().mean().item(),
        "greedy_match": same.double().mean().item(),
        "greedy_prefix": first_diff.double().mean().item(),
        "n_tokens": conts.numel(),
    }
