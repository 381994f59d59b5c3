"""Quality against weight bytes per decode step: POP, its ablations and the proxy-scored candidates.

    python examples/proxy_frontier.py out/eval/eval.partial.json out/eval-proxy/eval.json --out out/frontier.png

Reads evaluation results (``pop-fx eval`` / ``examples/eval_smollm2.py`` JSON; several files are merged, the
first file's row of a method wins), keeps one sparsity, and places every method at (fp32 FFN weight bytes
per decode step / dense, perplexity / dense perplexity). Bytes come from ``pop_fx.tools.costmodel`` with the
rounded partition sizes of the model's FFN shape (SmolLM2: d_model 576, d_ff 1536). Prints a Markdown table;
with ``--out`` also draws the frontier with the targets of the "beyond" issue (ppl ≤ 1.25× dense, bytes ≤
POP γ=0.2's).
"""

from __future__ import annotations

import argparse
import json
import math

from pop_fx.tools.costmodel import proxy_site_bytes, site_cost


def method_bytes(name: str, gamma: float | None, r: float, d_model: int, d_ff: int) -> float:
    dense = site_cost("gated", d_model, d_ff, r, 0.0).dense_bytes["fp32"]
    if name == "dense":
        return 1.0
    if name.startswith("proxy-"):
        from pop_fx.tools.evaluation import PROXY_METHODS

        proxy = next(x for p, x in PROXY_METHODS if name.startswith(p))
        return proxy_site_bytes("gated", d_model, d_ff, r, gamma, proxy) / dense
    g = gamma if gamma is not None and not (isinstance(gamma, float) and math.isnan(gamma)) else 0.0
    return site_cost("gated", d_model, d_ff, r, g).pop_bytes["fp32"] / dense  # static masks: γ = 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="eval JSON files")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-ff", type=int, default=1536)
    p.add_argument("--out", help="PNG of the frontier")
    args = p.parse_args(argv)

    rows, dense_ppl = {}, None
    for path in args.results:
        for row in json.load(open(path))["results"]:
            if row["method"] == "dense":
                dense_ppl = dense_ppl or row["perplexity"]
            elif abs(row["sparsity"] - args.sparsity) < 1e-9:
                rows.setdefault(row["method"], row)
    if dense_ppl is None:
        raise SystemExit("no dense row in the results: its perplexity is the reference")
    pop02 = method_bytes("pop-0.2", 0.2, args.sparsity, args.d_model, args.d_ff)
    table = [("dense", 1.0, dense_ppl, 1.0)]
    for name, row in rows.items():
        b = method_bytes(name, row.get("gamma"), args.sparsity, args.d_model, args.d_ff)
        table.append((name, b, row["perplexity"], row["perplexity"] / dense_ppl))
    table.sort(key=lambda t: t[1])
    print(f"r={args.sparsity:g}, d_model {args.d_model}, d_ff {args.d_ff}; targets: ppl <= 1.25x dense, "
          f"bytes <= POP γ=0.2's ({pop02:.3f} of dense)")
    print("| method | FFN bytes / dense | perplexity | × dense | meets both |")
    print("|---|---|---|---|---|")
    for name, b, ppl, ratio in table:
        ok = "yes" if (ratio <= 1.25 and b <= pop02 + 1e-12 and name != "dense") else "no"
        print(f"| {name} | {b:.3f} | {ppl:.2f} | {ratio:.3f} | {ok} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, b, _, ratio in table:
            if ratio > 8:  # off the chart (e.g. a random mask): in the printed table only
                continue
            color = "tab:red" if name.startswith("proxy") else "tab:blue"
            ax.scatter([b], [ratio], color=color)
            ax.annotate(name, (b, ratio), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(1.25, color="gray", ls="--", lw=1)
        ax.axvline(pop02, color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("fp32 FFN weight bytes per decode step / dense (costmodel)")
        ax.set_ylabel("decode perplexity / dense")
        ax.set_title(f"SmolLM2 r={args.sparsity:g}: quality vs bytes (targets: dashed, dotted)")
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
