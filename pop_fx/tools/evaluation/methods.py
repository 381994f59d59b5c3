"""The methods ``pop-fx eval`` compares, by name: dense, static, pop-<γ>, full, the proxy methods, the layer-adaptive
budgets (<budget>-<γ>, e.g. mass-0.1), wanda-sp, random."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from pop_fx.config import PopConfig

DEFAULT_SPARSITIES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_GAMMAS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_METHODS = ("dense", "static", "pop", "full", "wanda-sp", "random")
METHOD_NAMES = ("dense", "static", "pop", "pop-<γ>", "full", "wanda-sp", "random", "proxy-<γ>", "proxy-int3-<γ>",
                "proxy-gate-<γ>", "proxy-values-<γ>", "<budget>-<γ>")
# method prefix -> PopConfig.candidate_proxy (longest prefixes first)
PROXY_METHODS = (("proxy-values-", "int8-values"), ("proxy-gate-", "int8-gate"), ("proxy-int3-", "int3"),
                 ("proxy-", "int8"))
BACKENDS = ("reference", "compiled")


@dataclass(frozen=True)
class Method:
    name: str
    """as shown in the table: dense, static, pop-0.1, full, wanda-sp, random"""
    kind: str
    """"dense", "pop" (the reference or compiled POP) or "mask" (one fixed mask per site)"""
    gamma: float | None = None
    """POP's candidate ratio γ (0 = static, 2 = full re-evaluation)"""
    proxy: str | None = None
    """PopConfig.candidate_proxy (proxy-<γ>: "int8", proxy-int3-<γ>: "int3", proxy-gate-<γ>: "int8-gate",
    proxy-values-<γ>: "int8-values", whose H comes from the int8 copy; proxy-values-2 is its intended form); None
    for the paper's POP"""
    budget: str = "uniform"
    """PopConfig.budget (<budget>-<γ>: a layer-adaptive budget of pop_fx.allocation, e.g. mass-0.1; mass-0 and
    mass-2 are its static and full re-evaluation rows); "uniform" for the paper's POP"""


def adaptive_budgets() -> tuple[str, ...]:
    """The PopConfig.budget values other than "uniform": each is a method prefix."""
    from pop_fx.allocation import BUDGETS

    return tuple(b for b in BUDGETS if b != "uniform")


def parse_methods(methods: Iterable[str], gammas: Sequence[float] = DEFAULT_GAMMAS) -> list[Method]:
    """Method names -> Methods; "pop" expands to one POP method per γ in ``gammas``. Dense always comes first."""
    out: list[Method] = [Method("dense", "dense")]
    for raw in methods:
        name = raw.strip().lower()
        if name in ("", "dense"):
            continue
        if name == "static":
            found = [Method("static", "pop", 0.0)]
        elif name == "full":
            found = [Method("full", "pop", 2.0)]
        elif name == "pop":
            found = [Method(f"pop-{g:g}", "pop", float(g)) for g in gammas]
        elif name.startswith("pop-"):
            try:
                g = float(name[4:])
            except ValueError:
                raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}") from None
            found = [Method(f"pop-{g:g}", "pop", g)]
        elif name.startswith("proxy-"):
            prefix, proxy = next((p, x) for p, x in PROXY_METHODS if name.startswith(p))
            try:
                g = float(name[len(prefix):])
            except ValueError:
                raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}") from None
            found = [Method(f"{prefix}{g:g}", "pop", g, proxy)]
        elif name.rpartition("-")[0] in adaptive_budgets():
            budget, _, tail = name.rpartition("-")
            try:
                g = float(tail)
            except ValueError:
                raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}") from None
            found = [Method(f"{budget}-{g:g}", "pop", g, budget=budget)]
        elif name in ("wanda-sp", "random"):
            found = [Method(name, "mask")]
        else:
            raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}")
        for m in found:
            if m.gamma is not None:
                PopConfig(candidate_ratio=m.gamma)  # range check, naming the field
            if m not in out:
                out.append(m)
    return out
