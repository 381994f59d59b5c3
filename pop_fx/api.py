"""The user-facing verbs: compile, decompile, reset, report."""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from pop_fx import state as _state
from pop_fx.config import PopConfig


def compile(model: torch.nn.Module, config: PopConfig | dict | None = None, *, mode: str | None = None,
            options: dict | None = None, **fields: Any) -> torch.nn.Module:
    """Compile ``model`` in place with ``backend="pop"`` so that ``model.generate()`` uses it; returns the model.

    ``torch.compile(model).generate(...)`` would run the *uncompiled* forward (``generate`` is the
    original module's method), so this compiles the module in place (``model.compile``). It also
    makes every new ``generate()`` start from a clean partition (a generation continued from a returned cache
    keeps it), and points transformers' own auto-compile (CUDA + static cache) at the same backend via
    ``generation_config.compile_config``. ``mode`` is Inductor's mode (e.g. "reduce-overhead"); ``options``
    (as in ``torch.compile``) and ``fields`` are PopConfig fields. Models compiled with equal configs share
    the compiled graphs; each finds its own state from its weights at every call.
    """
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options={options!r} is invalid: allowed a dict of PopConfig fields or None")
    cfg = PopConfig.from_options(config, **{**(options or {}), **fields})
    if mode is not None:
        cfg = cfg.replace(mode=mode)
    cfg.check_compiled()
    backend = backend_for(cfg)
    _experts_for_compile(model)
    model.compile(backend=backend)
    model._pop_config = cfg
    if hasattr(model, "generate") and "generate" not in vars(model):
        # A method bound to this model (not a closure): copy.deepcopy binds the copy's generate to the copy.
        model.generate = types.MethodType(_generate, model)
    gen_cfg = getattr(model, "generation_config", None)
    on_cuda = any(p.is_cuda for p in model.parameters())
    if gen_cfg is not None and on_cuda:  # transformers auto-compiles only on CUDA (and warns elsewhere)
        try:
            from transformers import CompileConfig

            gen_cfg.compile_config = CompileConfig(backend=backend, mode=None)
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    return model


@functools.lru_cache(maxsize=None)
def backend_for(config: PopConfig):
    """The one backend callable of a config: Dynamo reuses compiled graphs only for the same backend object, so
    models compiled with equal configs share their graphs (and stay under Dynamo's recompile limit)."""
    from pop_fx.backend import pop_backend

    return functools.partial(pop_backend, config=config)


def _generate(model: torch.nn.Module, *args, **kwargs):
    """``model.generate`` of a ``pop_fx.compile``d model: a new generation never reads the previous one's partition
    (one-token prompts included); one continued from a returned, non-empty cache keeps it."""
    if model._compiled_call_impl is None and "_pop_config" in vars(model):
        # torch drops a module's compiled forward when it is deep-copied or pickled (Module.__getstate__): the copy
        # of a compiled model compiles again, with its own config, and finds its own state from its own weights.
        model.compile(backend=backend_for(model._pop_config))
    if not _continues(kwargs):
        reset(model)
    hits = recompile_limit_hits()
    out = type(model).generate(model, *args, **kwargs)
    if recompile_limit_hits() > hits:
        vars(model)["_pop_recompile_limit_hit"] = True
        warnings.warn(RECOMPILE_LIMIT_WARNING.format(torch._dynamo.config.recompile_limit), stacklevel=2)
    return out


def _continues(kwargs: dict) -> bool:
    """Does this generate() continue from a cache that already holds tokens (transformers 5.2x calls it ``cache``)?"""
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    if past is None:
        return False
    try:
        return int(past.get_seq_length()) > 0
    except (AttributeError, TypeError):  # a legacy tuple cache
        return bool(len(past)) and past[0][0].shape[-2] > 0


RECOMPILE_LIMIT_WARNING = (
    "pop: Dynamo hit torch._dynamo.config.recompile_limit ({}) on this model: forwards of new shapes now run "
    "uncompiled (dense), and a decode step whose prefill ran uncompiled prunes with the data-free partition "
    "instead of POP's; raise the limit or keep shapes steady")


def recompile_limit_hits() -> int:
    """How many frames Dynamo stopped compiling because of the recompile limit (a process-wide counter)."""
    from torch._dynamo.utils import counters

    return sum(n for k, n in counters["unimplemented"].items() if k.startswith("Dynamo recompile limit exceeded"))


def decompile(model: torch.nn.Module) -> torch.nn.Module:
    """The way back: the dense, uncompiled model (its Parameters were never modified)."""
    model._compiled_call_impl = None
    vars(model).pop("generate", None)
    vars(model).pop("_pop_config", None)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and getattr(gen_cfg, "compile_config", None) is not None:
        gen_cfg.compile_config = None
    for attr in ("_compiled_call", "_last_compile_config", "_pop_recompile_limit_hit"):
        vars(model).pop(attr, None)
    if "_pop_experts_implementation" in vars(model):
        model.set_experts_implementation(vars(model).pop("_pop_experts_implementation"))
    reset(model)
    return model


def _experts_for_compile(model: torch.nn.Module) -> None:
    """Switch transformers' ``eager`` experts implementation to ``grouped_mm`` (undone by ``decompile``).

    ``eager`` loops over a data-dependent ``nonzero()``: Dynamo breaks the graph there and the experts
    would run outside every graph, unpruned and unreported. ``grouped_mm`` (transformers' default under
    compile) computes the same function in one graph, where the pop backend rewrites the experts block.
    """
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    has_experts = any(isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3
                      and hasattr(m, "_apply_gate") for m in model.modules())
    if impl == "eager" and has_experts and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm")
        vars(model).setdefault("_pop_experts_implementation", impl)


def reset(model: torch.nn.Module) -> None:
    """Forget every partition of ``model``: the next forward starts from a clean state."""
    _state.reset(model)


@dataclass
class Report:
    """What the pop backend did with a model's FFNs."""

    sites: list[dict] = field(default_factory=list)
    dense: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    choices: list[dict] = field(default_factory=list)
    """Per decode op and shapes, the implementation its lowering chose (``pop_fx.autotune``): ``op``, ``shapes``,
    ``choice``, ``how`` ("measured" / "cached" by Inductor's autotuner, "pinned", "only choice", "fallback: ...",
    "earlier: ..." when a graph came from Inductor's FX graph cache) and ``times_ms``, the benchmark time Inductor
    saw for each choice"""

    @property
    def extra_bytes(self) -> int:
        return sum(s["extra_bytes"] for s in self.sites)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s["kind"]] = out.get(s["kind"], 0) + 1
        out["dense"] = len(self.dense)
        return out

    def as_dict(self) -> dict:
        return {"sites": self.sites, "dense": self.dense, "warnings": self.warnings, "choices": self.choices,
                "counts": self.counts(), "extra_bytes": self.extra_bytes}

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} POP sites, {len(self.dense)} FFN-like blocks left dense, "
                 f"{self.extra_bytes / 2**20:.1f} MiB of layout buffers"]
        lines.append(f"{'path':40s} {'kind':13s} {'act':10s} {'d_ff':>6s} {'|R|':>6s} {'|C|':>6s} {'|P|':>6s} graphs")
        for s in self.sites:
            note = "" if s.get("reason", "pop") == "pop" else f"  {s['reason']}"
            lines.append(f"{s['path']:40s} {s['kind']:13s} {s['activation']:10s} {s['d_ff']:6d} {s['n_R']:6d} "
                         f"{s['n_C']:6d} {s['n_P']:6d} {','.join(s['graphs'])}{note}")
        for d in self.dense:
            lines.append(f"{d['path']:40s} dense: {d['reason']}")
        if self.choices:
            lines.append(f"{'op':20s} {'shapes':46s} {'choice':14s} how [Inductor's benchmark, ms]")
        for c in self.choices:
            times = ", ".join(f"{k} {v:.4g}" for k, v in sorted(c["times_ms"].items(), key=lambda kv: kv[1]))
            lines.append(f"{c['op']:20s} {c['shapes']:46s} {c['choice']:14s} {c['how']}" + (f" [{times}]" if times else ""))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def report(model: torch.nn.Module, config: PopConfig | None = None) -> Report:
    """Every POP site of ``model`` (path, kind, d_ff, |R|, |C|, |P|), every FFN-like block left dense, with why, and
    the implementation each decode op's lowering chose (``choices``: Inductor's autotuner under ``kernels="auto"``).

    Filled as graphs are compiled: call it after a ``generate()`` (or any forward) of the compiled model. Models
    compiled with equal configs share their graphs, and so their choices.
    """
    from pop_fx import autotune

    cfg = config or getattr(model, "_pop_config", None)
    rep = Report()
    rep.choices = [d.as_dict() for d in autotune.decisions(cfg, earlier=cfg is not None)]
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        path = name.rsplit(".", 2)[0] if name.count(".") >= 2 else name
        notes = [n for c, ns in _state.notes_of(p).items() if cfg is None or c == cfg for n in ns]
        pruned = [n for n in notes if n["reason"].startswith("pop")]
        left_dense = [n for n in notes if not n["reason"].startswith("pop")]
        # A site's reason when it differs from plain POP (e.g. candidates scored exactly under candidate_proxy).
        special = sorted({n["reason"] for n in pruned if n["reason"] != "pop"})
        for c, st in _state.states_of(p).items():
            if cfg is not None and c != cfg:
                continue
            s = st.sizes
            # A routed-experts state holds E sites (one row per expert); its layout bytes are split evenly.
            rows = st.report_sites() if hasattr(st, "report_sites") else [(path, st.kind)]
            for row_path, kind in rows:
                rep.sites.append({
                    "path": row_path, "kind": kind, "activation": st.info.get("activation", ""),
                    "pattern": st.info.get("pattern", ""), "d_ff": st.d_ff, "n_keep": s.n_keep,
                    "n_R": s.n_R, "n_C": s.n_C, "n_P": s.n_P, "graphs": sorted(st.graphs),
                    "reason": "; ".join(special) or "pop", "extra_bytes": st.extra_bytes // len(rows),
                })
            if st.graphs == {"decode"}:
                rep.warnings.append(f"{path}: decode graphs are pruned but no prefill graph was (a graph break or "
                                    "the recompile limit ran the prefill without POP): decoding uses a stale or "
                                    "empty partition")
        site_path = left_dense[0]["path"] if left_dense and left_dense[0]["path"] else path
        if left_dense and pruned:  # one graph pruned it, another ran it dense: its prefill and decode disagree
            for n in left_dense:
                rep.warnings.append(f"{site_path}: a {n['graph']} graph ran it unpruned ({n['reason']}) while "
                                    f"{'/'.join(sorted({m['graph'] for m in pruned}))} graphs pruned it")
        elif left_dense:
            nt = left_dense[-1]
            rep.dense.append({"path": path, "kind": nt["kind"], "reason": nt["reason"], "matched": nt["matched"]})
    # Vision towers never reach a decode graph (transformers' generate() even encodes images before the
    # compiled forward): list their FFNs from the live model, with docs/spec.md's reason.
    from pop_fx.sites import VISION_REASON, find_module_sites

    listed = {d["path"] for d in rep.dense}
    for path, reason in find_module_sites(model)[1]:
        if reason == VISION_REASON and path not in listed:
            rep.dense.append({"path": path, "kind": None, "reason": reason, "matched": False})
    if vars(model).get("_pop_recompile_limit_hit"):
        rep.warnings.append(RECOMPILE_LIMIT_WARNING.format(torch._dynamo.config.recompile_limit))
    # An FFN the module tree shows but no compiled graph contained (a graph break between its projections
    # puts them in different graphs, where no pass can see the whole block) runs dense: say so.
    if cfg is not None:
        found = {s["path"] for s in rep.sites} | {d["path"] for d in rep.dense}
        for site in find_module_sites(model)[0]:
            if site.kind != "expert" and site.path not in found:
                rep.warnings.append(f"{site.path}: FFN found in no graph the pop backend compiled (a graph break "
                                    "splits it, or it has not run yet): it runs dense")
    return rep
