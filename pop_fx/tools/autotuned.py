"""The autotuned lowering in the benchmarks: ``pop[<choice>]`` variants (one decode implementation pinned, beside
``pop`` with ``kernels="auto"``), what ``pop`` chose, and the machine's load printed beside every table. Shared by
``bench`` and ``bench_moe``."""

from __future__ import annotations


def pinned_choice(variant: str) -> str | None:
    """The choice a ``pop[<choice>]`` variant pins, or None."""
    return variant[4:-1] if variant.startswith("pop[") and variant.endswith("]") else None


def choice_variants(op: str, device: str = "cpu", serves=None) -> tuple[str, ...]:
    """``pop[<choice>]`` for every choice of ``op`` that runs on ``device`` (Triton ones on CUDA only) and that
    ``serves`` (a predicate on the choice name) accepts."""
    from pop_fx import autotune

    return tuple(f"pop[{c.name}]" for c in autotune.registry()[op].choices
                 if (c.family != "triton" or device == "cuda") and (serves is None or serves(c.name)))


def pinned_compile(model, config, op: str, choice: str, mode: str | None = None):
    """``pop_fx.compile`` with ``op``'s implementation pinned to ``choice``: a backend of its own (Dynamo never
    hands one variant's graphs to another), compiling under ``autotune.pinned`` (the pin enters the graph and
    Inductor's cache keys)."""
    import pop_fx
    from pop_fx import autotune
    from pop_fx.backend import PopCompiler

    cfg = config.replace(mode=mode) if mode else config
    compiler = PopCompiler(cfg)

    def backend(gm, example_inputs, **_):
        with autotune.pinned({op: choice}):
            return compiler(gm, example_inputs)

    m = pop_fx.compile(model, cfg)
    m.compile(backend=backend)
    return m


def auto_summary(cells: dict, decisions: list, higher_better: bool) -> dict | None:
    """What ``pop`` (autotuned) chose and how it compares with the fastest ``pop[<choice>]`` of the run."""
    fixed = {v: c for v, c in cells.items() if pinned_choice(v) and c.times}
    if "pop" not in cells or not cells["pop"].times:
        return None
    out = {"chosen": [{"op": d.op, "choice": d.choice, "how": d.how, "times_ms": d.times_ms} for d in decisions]}
    if fixed:
        best = (max if higher_better else min)(fixed.values(), key=lambda c: c.median)
        ratio = cells["pop"].median / best.median if higher_better else best.median / cells["pop"].median
        out.update(best_fixed=best.variant, auto_vs_best=ratio)  # > 1: auto is faster
    return out



def load_average() -> float | None:
    """The 1-minute load average when the cell finished (this machine is shared: figures need it beside them)."""
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def print_auto(meta: dict) -> None:
    """The autotuner's line under a table: what ``pop`` chose (Inductor's times) and ``pop`` against the best fixed
    choice, with the machine's load and the dense baseline's bandwidth."""
    auto = meta.get("auto") or {}
    for c in auto.get("chosen", []):
        times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(c["times_ms"].items(), key=lambda kv: kv[1]))
        print(f"auto: {c['op']} -> {c['choice']} ({c['how']}{'; Inductor ms: ' + times if times else ''})")
    if "auto_vs_best" in auto:
        print(f"auto vs best fixed ({auto['best_fixed']}): {auto['auto_vs_best']:.3f} (> 1: auto faster)")
    extra = f", dense {meta['dense_gb_s']:.1f} GB/s" if meta.get("dense_gb_s") else ""
    print(f"load average {meta.get('load')}{extra}\n")


__all__ = ["auto_summary", "choice_variants", "load_average", "pinned_choice", "pinned_compile", "print_auto"]
