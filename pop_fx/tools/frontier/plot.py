"""The frontier's figure: quality against measured decode speed, the Pareto front, the pick and the budget."""

from __future__ import annotations

from pathlib import Path

from pop_fx.tools.frontier.pareto import usable
from pop_fx.tools.frontier.settings import Point


def plot(result, path: str | Path) -> Path:
    """PNG of a ``FrontierResult``: quality (perplexity / dense, log; or agreement) against measured decode speed /
    dense, the Pareto front, the pick and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result.budget.metric
    q = (lambda p: p.ppl_ratio) if metric == "ppl" else (lambda p: p.agreement)
    pts = [p for p in result.points if usable(p)]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    families = {"dense": "black", "static": "tab:gray", "pop": "tab:blue", "full": "tab:green",
                "proxy": "tab:red"}

    def family(p: Point) -> str:
        m = p.setting.method
        return "proxy" if m.startswith("proxy") else ("pop" if m.startswith("pop-") else m)

    seen = set()
    for p in pts:
        fam = family(p)
        kw = dict(s=70 if p.pareto else 40, color=families.get(fam, "tab:purple"), zorder=3,
                  edgecolors="black" if p.pareto else "none", linewidths=1.2)
        if fam not in seen:
            kw["label"] = {"pop": "POP (γ per label)", "proxy": "proxy-scored candidates", "full":
                           "full re-evaluation (γ=2)", "static": "static mask (γ=0)"}.get(fam, fam)
            seen.add(fam)
        ax.scatter([p.speedup], [q(p)], **kw)
        ax.annotate(p.setting.label, (p.speedup, q(p)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted((p for p in pts if p.pareto), key=lambda p: p.speedup)
    if len(front) > 1:
        ax.step([p.speedup for p in front], [q(p) for p in front], where="post" if metric == "ppl" else "pre",
                color="black", lw=1, ls="-", alpha=0.5, zorder=2, label="Pareto front (outlined points)")
    if result.pick is not None:
        ax.scatter([result.pick.speedup], [q(result.pick)], marker="*", s=320, color="gold", edgecolors="black",
                   zorder=4, label=f"pick: {result.pick.setting.label}")
    ax.axhline(result.budget.value, color="tab:orange", ls="--", lw=1, label=f"budget: {result.budget.describe()}")
    ax.axvline(1.0, color="black", ls=":", lw=0.8)
    if metric == "ppl":
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_ylabel("decode-mode perplexity / dense (log; lower is better)")
    else:
        ax.set_ylabel("next-token agreement with dense (higher is better)")
    low = result.info.get("lowering", "inductor")
    ax.set_xlabel(f"measured decode tokens/s / dense's (both lowered by {low}; higher is faster)")
    i = result.info
    ax.set_title(f"{i.get('model')}: quality vs measured decode speed\n"
                 f"{i.get('windows')} windows of {i.get('prompt_len')}+{i.get('cont_len')} tokens of "
                 f"{i.get('text_name')}; speed: median of {i.get('rounds')} interleaved rounds, "
                 f"{i.get('threads')} threads", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["plot"]
