"""PopConfig: the one configuration object of pop-fx.

Every field has a default, so ``torch.compile(model, backend="pop")`` works with
no options. Any invalid value, type or unknown key raises ``ValueError`` naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

_SCOPES = ("batch", "sequence")
_PREFILLS = ("pruned", "dense")
_EMPTY_EXPERT = ("weights", "dense")
_LOWERINGS = ("inductor", "eager")
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_PROXIES = (None, "int8", "int8-gate", "int3", "int8-values")
_KERNELS = ("auto", "torch", "triton")
_BUDGETS = ("uniform", "mass", "energy")  # pop_fx.allocation.BUDGETS (tested equal; not imported: allocation imports torch)


@dataclass(frozen=True)
class PopConfig:
    """How POP prunes every FFN site (see docs/spec.md)."""

    sparsity: float = 0.5
    """r: fraction of each FFN's intermediate channels inactive at every decode step, 0 <= r < 1."""

    candidate_ratio: float = 0.1
    """γ: width of the candidate band as a fraction of d_ff, 0 <= γ <= 2 (0 = static mask, 2 = full re-evaluation)."""

    candidate_proxy: str | None = None
    """None: candidates are scored exactly, from their computed activations (the paper). "int8": candidates are
    ranked every step from a per-row int8 copy of their gate and up rows (data-free, made once from the
    weights) and only R and the chosen ones are computed exactly; "int3": from a per-row 3-bit copy (bit-plane
    packed, 3 bits per weight); "int8-gate": from the gate rows alone (CATS-like |act(g)|). "int8-values": a
    low-precision full re-evaluation with an exact down projection — gate/up of every channel from the per-row int8
    copy (bf16 activations and scales, bf16 products), candidates ranked from them as POP ranks (R always kept),
    and the chosen channels' int8-derived activations used directly as H (no exact gate/up at all); the down
    projection is exact over the n_keep chosen channels only. Its H carries the int8 copy's error
    (docs/design.md, "int8-values");
    candidate_ratio=2 (every channel a candidate) is what it is for. Gated FFNs with a known activation only; a
    wide band (e.g. candidate_ratio 0.6) is what the other proxies are for. Beyond the paper: see docs/design.md
    "Proxy-scored candidates"."""

    scope: str = "batch"
    """"batch": one partition shared by the batch (the paper); "sequence": one partition per sequence."""

    prefill: str = "pruned"
    """"pruned": the prefill's down projection uses R ∪ top candidates (the paper); "dense": prefill stays exact."""

    budget: str = "uniform"
    """"uniform": every FFN keeps round((1 - r)·d_ff) channels (the paper); "mass": at each prefill, channels move
    between FFNs of one d_ff under the same total, to those whose top channels hold less of the prompt's importance
    mass; "energy": to those with the most importance energy outside their top channels (``pop_fx.allocation``;
    eager reference only, beyond the paper)."""

    empty_expert: str = "weights"
    """Expert that got no prefill token: "weights" = data-free partition from weight norms, "dense" = not pruned."""

    lowering: str = "inductor"
    """"inductor": lower the rewritten graph through Inductor; "eager": run it as is (cheap, for tests)."""

    mode: str | None = None
    """Inductor mode for the lowering (e.g. "reduce-overhead" for CUDA graphs); None = Inductor's default."""

    regional: bool = True
    """Compile each distinct repeated block (a decoder layer) once and call it for every identical layer
    (``pop_fx/regional.py``: seconds instead of minutes for a cold compile); False = Inductor compiles the whole
    graph at once (fusion across layer boundaries). CUDA-graph modes always compile the whole graph."""

    kernels: str = "auto"
    """How the decode ops are implemented (``pop_fx.autotune``): "auto" = Inductor benchmarks every equivalent
    implementation that serves the op's shapes on this machine at compile time and inlines the fastest
    (``pop_fx.report(model).choices`` says which, with Inductor's times); "torch" pins the torch family (masked
    GEMV; cuBLAS on CUDA), "triton" pop-fx's Triton kernels where they serve (CUDA; elsewhere the torch family).
    With ``lowering="eager"`` nothing is measured: "auto" runs the torch family."""

    inductor: Any = ()
    """Inductor settings the compiled graphs are lowered under, as ``torch.compile(options=...)`` would pass them
    (e.g. ``{"cpp_wrapper": True}``): a dict of ``torch._inductor.config`` keys, kept as sorted (key, value) pairs so
    that equal configs share their graphs. Unknown keys raise ValueError. () = Inductor's defaults."""

    max_batch_size: int = 64
    """scope="sequence": sequences per batch that per-sequence state is allocated for, >= 1."""

    debug: bool = False
    """Log every graph's pass counts and the graphs before and after the rewrite (the ``pop_fx`` logger, stderr)."""

    def __post_init__(self) -> None:
        _check_real("sparsity", self.sparsity, 0.0, 1.0, "0 <= sparsity < 1", hi_open=True)
        _check_real("candidate_ratio", self.candidate_ratio, 0.0, 2.0, "0 <= candidate_ratio <= 2")
        _check_choice("candidate_proxy", self.candidate_proxy, _PROXIES)
        _check_choice("scope", self.scope, _SCOPES)
        _check_choice("prefill", self.prefill, _PREFILLS)
        _check_choice("budget", self.budget, _BUDGETS)
        _check_choice("empty_expert", self.empty_expert, _EMPTY_EXPERT)
        _check_choice("lowering", self.lowering, _LOWERINGS)
        _check_choice("mode", self.mode, _MODES)
        _check_choice("kernels", self.kernels, _KERNELS)
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, numbers.Integral) or self.max_batch_size < 1:
            raise ValueError(
                f"PopConfig.max_batch_size={self.max_batch_size!r} is invalid: allowed an integer >= 1"
            )
        object.__setattr__(self, "inductor", _inductor_items(self.inductor))
        for name in ("debug", "regional"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PopConfig.{name}={getattr(self, name)!r} is invalid: allowed True or False")
        # Normalise numbers so that equal configs hash equal (0.5 vs numpy.float64(0.5)).
        object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "candidate_ratio", float(self.candidate_ratio))
        object.__setattr__(self, "max_batch_size", int(self.max_batch_size))

    # Presets: the paper's two ablation baselines.
    @classmethod
    def static(cls, sparsity: float = 0.5, **fields: Any) -> "PopConfig":
        """γ = 0: the mask chosen at prefill is used for every decode step (GRIFFIN-like)."""
        return cls(sparsity=sparsity, candidate_ratio=0.0, **fields)

    @classmethod
    def full_reevaluation(cls, sparsity: float = 0.5, **fields: Any) -> "PopConfig":
        """γ = 2: every channel is a candidate, re-scored at every decode step."""
        return cls(sparsity=sparsity, candidate_ratio=2.0, **fields)

    @classmethod
    def from_options(cls, options: "PopConfig | Mapping[str, Any] | None" = None, **overrides: Any) -> "PopConfig":
        """Build a config from ``torch.compile(..., options=...)``; unknown keys raise ValueError."""
        if isinstance(options, PopConfig):
            base = dataclasses.asdict(options)
        elif options is None:
            base = {}
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise ValueError(
                f"options={options!r} is invalid: allowed a dict of PopConfig fields, a PopConfig or None"
            )
        base.update(overrides)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in base if k not in allowed)
        if unknown:
            raise ValueError(f"unknown PopConfig option(s) {unknown}: allowed {allowed}")
        return cls(**base)

    def check_compiled(self) -> "PopConfig":
        """Raise ValueError for a combination the compiled backend cannot serve (the eager reference can)."""
        if self.candidate_proxy is not None and self.scope != "batch":
            raise ValueError(f"PopConfig.candidate_proxy={self.candidate_proxy!r} with scope={self.scope!r}: the "
                             "compiled proxy ops serve scope='batch' only (pop_fx.reference.pruned runs both scopes); "
                             "allowed candidate_proxy=None with scope='sequence'")
        if self.budget != "uniform":
            raise ValueError(f"PopConfig.budget={self.budget!r}: the compiled backend serves budget='uniform' only "
                             "(pop_fx.reference.pruned runs every budget); allowed budget='uniform'")
        return self

    @property
    def kernel_code(self) -> int:
        """What the decode ops' ``kernels`` argument carries in the traced graph: 0 = torch ops, 1 = Triton kernels
        (CUDA only). "auto" traces as 0; the backend's ``autotune.KernelsPass`` rewrites it before lowering."""
        return 1 if self.kernels == "triton" else 0

    def replace(self, **changes: Any) -> "PopConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _inductor_items(value) -> tuple:
    """``PopConfig.inductor`` as sorted (key, value) pairs of known ``torch._inductor.config`` keys."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        items = sorted((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"PopConfig.inductor={value!r} is invalid: allowed a dict of torch._inductor.config "
                         "settings, e.g. {'cpp_wrapper': True}") from None
    if not items:
        return ()
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    for k, v in items:
        if k not in known:
            raise ValueError(f"PopConfig.inductor key {k!r} is not a torch._inductor.config setting: allowed keys of "
                             "torch._inductor.config, e.g. 'cpp_wrapper', 'freezing'")
        try:
            hash(v)
        except TypeError:
            raise ValueError(f"PopConfig.inductor[{k!r}]={v!r} is invalid: allowed a hashable value") from None
    return tuple(items)


def _check_real(name, value, lo, hi, allowed, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"PopConfig.{name}={value!r} has type {type(value).__name__}: allowed a number, {allowed}")
    v = float(value)
    if not (v == v) or v < lo or v > hi or (hi_open and v >= hi):
        raise ValueError(f"PopConfig.{name}={value!r} is out of range: allowed {allowed}")


def _check_choice(name, value, choices):
    if value not in choices or (value is not None and not isinstance(value, str)):
        raise ValueError(f"PopConfig.{name}={value!r} is invalid: allowed one of {list(choices)}")


__all__ = ["PopConfig"]
