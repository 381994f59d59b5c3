"""Lowering the ``pop::`` decode ops through Inductor's autotuner: every numerically equivalent implementation of an
op is a *choice*; under ``PopConfig(kernels="auto")`` Inductor benchmarks the choices that serve the op's inputs, on
this machine, at compile time, and inlines the fastest into the graph it is compiling (so it fuses with what is
around it, as a traced body does).

This is the one module that touches Inductor's private autotuning API (``torch._inductor.codegen.subgraph``,
``select_algorithm``, ``lowering.user_lowerings``). It moves between releases, so each piece is detected
(``support()``) and, where one is missing, the op falls back to today's hand-written dispatch:

* no lowering hook (``user_lowerings``) or no way to inline a traced body: the op stays an extern call of its
  eager body (today's dispatch, correct, unfused);
* no autotuner: today's dispatch for the requested family, inlined.

How it fits together:

* each op file calls ``register(...)`` with its choices (``Choice``: a name, a family, a function of the op's
  arguments by name, whether it serves given inputs) and its *default*: today's dispatch for a family code;
* the op's eager body is ``run(qualname, args)``: the default for its ``kernels`` code (or a pinned choice);
* ``KernelsPass`` (Inductor's post-grad custom pre-pass slot, set by the backend) writes the config's code into
  every ``pop::`` node's ``kernels`` argument: ``AUTO`` for ``kernels="auto"``, ``TORCH``/``TRITON`` to pin a
  family, ``PIN + i`` to pin choice ``i`` (``pinned()``, for ``pop-fx bench``'s fixed variants). The graph carries
  the decision, and the pass's uuid puts it in Inductor's cache keys;
* the lowering (``user_lowerings[op]``) reads the code: ``AUTO`` with two or more serving choices -> each choice is
  traced (``make_fx``) into a ``SubgraphChoiceCaller``, ``autotune_select_algorithm`` benchmarks them on random
  inputs of the real shapes (valid indices where an input indexes another: ``Choice`` owners give ``index_inputs``)
  and the winner's graph is inlined; anything else inlines the one choice the code names;
* on the CPU the choices are timed with the caches flushed before each call (``cold_cpu_time``), as a decode step
  meets its weights; Inductor's own CPU benchmark repeats a call on hot inputs;
* every decision is recorded (``decisions()``): op, shapes, the choice, how it was made and the benchmark times
  Inductor saw (a feedback saver on its selector). ``pop_fx.report(model).choices`` and ``pop-fx inspect`` show them.

What it costs: one Inductor compile per choice per distinct (op, shapes, dtype) the first time (the benchmark),
nothing after that while Inductor's autotune cache (``autotune_local_cache``, on disk) or its FX graph cache holds
the result. Regional compilation compiles one block per distinct layer, so identical layers tune once.

On the CPU, Inductor's C++ backend generates no Triton templates: a choice there is a traced torch body (C++ loops
around extern oneDNN/BLAS calls). On CUDA a choice may launch Triton kernels through ``wrap_triton``; they are
traced into the choice's graph like any op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

log = logging.getLogger("pop_fx")

TORCH, TRITON, AUTO = 0, 1, 2
"""values of an op's ``kernels`` argument: pin the torch family, pin the Triton family, let Inductor measure"""
PIN = 16
"""``kernels = PIN + i`` pins choice ``i`` of the op (its position in the op's registered choices)"""
CODES = {"torch": TORCH, "triton": TRITON, "auto": AUTO}


@dataclass(frozen=True)
class Choice:
    """One implementation of an op. ``fn`` takes the op's arguments by name (all but ``kernels``) and returns what
    the op returns; every choice of an op equals the op's reference within its dtype's tolerance
    (``tests/pop_fx/ops/test_choices.py``)."""

    name: str
    fn: Callable[..., torch.Tensor]
    family: str = "torch"
    """"torch" (torch ops; Inductor lowers them) or "triton" (pop-fx's Triton kernels, CUDA)"""
    serves: Callable[[Mapping[str, Any]], bool] = lambda a: True
    """whether the choice computes the op for these arguments (tensors or fakes of the real shapes, device, dtype)"""
    any_size: bool = True
    """``serves`` holds for every size the graph's symbolic sizes may take (False: it read a size, e.g. batch ≤ 16)"""


@dataclass
class OpChoices:
    qualname: str
    choices: tuple[Choice, ...]
    default: Callable[[int, Mapping[str, Any], bool], str]
    """today's dispatch: (family code or AUTO, arguments, lowering?) -> a choice name"""
    index_inputs: Callable[[Mapping[str, Any]], dict[str, Callable[[Sequence[int], torch.dtype, Any], torch.Tensor]]] \
        | None = None
    """benchmark values for the integer inputs that index others (name -> (shape, dtype, device) -> tensor)"""

    def by_name(self, name: str) -> Choice:
        return next(c for c in self.choices if c.name == name)

    def pick(self, code: int, args: Mapping[str, Any], lowering: bool) -> Choice:
        """The choice ``code`` names for these arguments: a pinned choice that serves them, else the default."""
        if code >= PIN and code - PIN < len(self.choices) and self.choices[code - PIN].serves(args):
            return self.choices[code - PIN]
        return self.by_name(self.default(code if code in (TORCH, TRITON, AUTO) else AUTO, args, lowering))


_REGISTRY: dict[str, OpChoices] = {}


def register(qualname: str, choices: Sequence[Choice], default, index_inputs=None) -> OpChoices:
    """Declare an op's choices (called by the op's file at import). Lowerings are installed lazily (``install``)."""
    ops = OpChoices(qualname, tuple(choices), default, index_inputs)
    _REGISTRY[qualname] = ops
    return ops


def registry() -> dict[str, OpChoices]:
    import pop_fx.ops  # noqa: F401  (importing the ops registers their choices)

    return dict(_REGISTRY)


def run(qualname: str, args: dict[str, Any]) -> torch.Tensor:
    """An op's eager body: the choice its ``kernels`` code names (today's dispatch unless pinned)."""
    ops = _REGISTRY[qualname]
    code = args.pop("kernels")
    return ops.pick(code, args, lowering=False).fn(**args)


def choice_code(qualname: str, name: str) -> int:
    """The ``kernels`` value that pins choice ``name`` of op ``qualname``."""
    ops = registry()[qualname]
    return PIN + [c.name for c in ops.choices].index(name)


# ----------------------------------------------------------------------------------------------
# pins (pop-fx bench's fixed variants) and the pass that writes the config's code into the graph
# ----------------------------------------------------------------------------------------------

_PINS = threading.local()


@contextlib.contextmanager
def pinned(pins: Mapping[str, str]):
    """Graphs compiled inside pin choices by name: ``{"pop::decode": "gather_mm"}`` (an op not named keeps the
    config's code). Read when the backend lowers a graph; the pins enter Inductor's cache keys."""
    registry()
    for op, name in pins.items():
        if op not in _REGISTRY or name not in [c.name for c in _REGISTRY[op].choices]:
            raise ValueError(f"pinned: {op}={name!r} is invalid: allowed "
                             f"{ {q: [c.name for c in o.choices] for q, o in _REGISTRY.items()} }")
    before = getattr(_PINS, "pins", {})
    _PINS.pins = {**before, **pins}
    try:
        yield
    finally:
        _PINS.pins = before


def _graph_pass_base():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - every torch pop-fx supports has it
        return object
    return CustomGraphPass


class KernelsPass(_graph_pass_base()):
    """Inductor's post-grad custom pre-pass (a ``CustomGraphPass``: Inductor's FX graph cache refuses any other): every ``pop::`` op with a ``kernels`` argument gets the config's code
    (or its pinned choice's), and its node meta the config (``decisions`` are filed under it). A pass the user
    already configured runs first; its uuid joins ours."""

    def __init__(self, config, inner=None):
        self.config = config
        self.code = CODES[config.kernels]
        self.pins = {op: choice_code(op, name) for op, name in sorted(getattr(_PINS, "pins", {}).items())}
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        for n in graph.nodes:
            target = n.target
            if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "pop":
                continue
            qualname = f"pop::{target._schema.name.split('::')[-1]}"
            names = [a.name for a in target._schema.arguments]
            if qualname not in _REGISTRY or "kernels" not in names:
                continue
            code = self.pins.get(qualname, self.code)
            i = names.index("kernels")
            if len(n.args) > i:
                n.args = n.args[:i] + (code,) + n.args[i + 1:]
            else:
                n.kwargs = {**n.kwargs, "kernels": code}
            n.meta["pop_config"] = self.config

    def uuid(self):
        inner = None
        if self.inner is not None:
            inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
            if inner is None:
                return None  # the user's pass opted out of caching: so do we
        return ("pop-kernels", BENCHMARK_METHOD, self.code, tuple(sorted(self.pins.items())), inner)


def inductor_patches(config, current: Mapping[str, Any]) -> dict[str, Any]:
    """The Inductor config patches the autotuned lowering needs (the backend merges them into its own): the
    ``kernels`` pass. Benchmarking needs no ``max_autotune``: Inductor benchmarks any selection with two or more
    choices, and caches the timings (``autotune_local_cache``) across processes."""
    install()
    from torch._inductor import config as inductor_config

    out = {"post_grad_custom_pre_pass": KernelsPass(config, current.get("post_grad_custom_pre_pass"))}
    if hasattr(inductor_config, "max_autotune_report_choices_stats"):
        out["max_autotune_report_choices_stats"] = False  # it prints a JSON line per selection to stdout
    return out


# ----------------------------------------------------------------------------------------------
# what this torch offers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def support() -> dict[str, bool]:
    """Which pieces of Inductor's private API this torch has: ``lowering`` (user lowerings: the hook),
    ``inline`` (trace a body and inline it as IR: without it the op stays an extern call), ``tune`` (subgraph
    choices, the selector and its feedback)."""
    out = {"lowering": False, "inline": False, "tune": False}
    try:
        from torch._inductor.lowering import user_lowerings  # noqa: F401

        out["lowering"] = True
    except ImportError:
        return out
    try:
        from torch._inductor.codegen.subgraph import inline_subgraph_to_ir_nodes  # noqa: F401
        from torch._inductor.ir import ir_node_to_tensor  # noqa: F401

        out["inline"] = True
    except ImportError:
        return out
    try:
        from torch._inductor.codegen.subgraph import SubgraphTemplate
        from torch._inductor.select_algorithm import add_feedback_saver, autotune_select_algorithm  # noqa: F401

        out["tune"] = hasattr(SubgraphTemplate, "generate_custom_op_choices")
    except ImportError:
        pass
    return out


_installed: set[str] = set()


def install() -> None:
    """Register the lowering of every op with choices (once per op; user lowerings take priority over Inductor's
    own). Each op's fake kernel calls it (any trace of an op reaches its fake before Inductor lowers it, whichever
    backend compiles it), and so does the backend. Without the hook nothing is registered: the ops are extern calls
    of their eager bodies."""
    if len(_installed) == len(_REGISTRY) or not support()["lowering"]:
        return
    from torch._inductor.lowering import user_lowerings

    for qualname, ops in registry().items():
        if qualname in _installed:
            continue
        ns, name = qualname.split("::")
        overload = getattr(getattr(torch.ops, ns), name).default
        user_lowerings[overload] = functools.partial(_lower, ops, overload)
        _installed.add(qualname)


# ----------------------------------------------------------------------------------------------
# decisions
# ----------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """One lowering of one op at one set of shapes: what ran and why."""

    op: str
    shapes: str
    choice: str
    how: str
    """"measured" (benchmarked now), "cached" (Inductor's autotune cache had the timings), "pinned" (a family or a
    choice named by the config / pins), "only choice", or "fallback: <why>" (today's dispatch)"""
    times_ms: dict[str, float] = field(default_factory=dict)
    """Inductor's benchmark time of every choice it measured, ms (empty unless measured or cached)"""
    config: Any = None

    def as_dict(self) -> dict:
        return {"op": self.op, "shapes": self.shapes, "choice": self.choice, "how": self.how,
                "times_ms": dict(self.times_ms)}

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        return f"{self.op:20s} {self.shapes:46s} {self.choice:14s} {self.how}" + (f" [{times} ms]" if times else "")


_DECISIONS: list[Decision] = []
_LOCK = threading.Lock()


def _config_key(config) -> str | None:
    """A config as the decisions' log keys it (a key read back from the log is already one)."""
    if config is None or isinstance(config, str):
        return config
    return repr(sorted(config.as_dict().items()))


def _log_path():
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "pop_fx" / "decisions.jsonl"


def decisions(config=None, earlier: bool = False) -> list[Decision]:
    """The decisions recorded in this process (those of graphs compiled under ``config`` if given), one per op and
    shapes (the latest). A graph served from Inductor's FX graph cache is not lowered again and records nothing:
    ``earlier=True`` adds the decisions earlier processes logged beside that cache (how = "earlier: ...")."""
    found = list(_DECISIONS)
    if earlier:
        found = _logged(config) + found
    out: dict[tuple, Decision] = {}
    for d in found:  # pinned graphs (pop-fx bench's fixed variants) and autotuned ones of one config apart
        if config is None or _config_key(d.config) == _config_key(config):
            key = (d.op, d.shapes, _config_key(config), d.how.endswith("pinned"))
            seen = out.get(key)
            # the same op and shapes lowered again in another graph (first and later decode graphs) hits the
            # autotune cache the first lowering filled: that first one says how the choice was made
            if seen is not None and seen.how == "measured" and d.how == "cached" and seen.choice == d.choice:
                continue
            out[key] = d
    return list(out.values())


def _logged(config) -> list[Decision]:
    import json

    try:
        lines = _log_path().read_text().splitlines()
    except (OSError, ImportError):
        return []
    key = _config_key(config)
    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if key is None or r.get("config") == key:
            out.append(Decision(r["op"], r["shapes"], r["choice"], "earlier: " + r["how"], r.get("times_ms", {}),
                                r.get("config")))
    return out


def clear() -> None:
    with _LOCK:
        _DECISIONS.clear()


def _record(d: Decision) -> Decision:
    import json

    with _LOCK:
        _DECISIONS.append(d)
        try:  # beside Inductor's caches: a process served from them can still say what was chosen
            path = _log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size > 1 << 20:  # keep the log small: its newer half
                lines = path.read_text().splitlines()
                path.write_text("\n".join(lines[len(lines) // 2:]) + "\n")
            with path.open("a") as f:
                f.write(json.dumps({**d.as_dict(), "config": _config_key(d.config)}) + "\n")
        except (OSError, ImportError):
            pass
    log.info("autotune: %s", d)
    return d


_TIMINGS: dict[str, dict[str, float]] = {}


def _feedback(timings, name, input_nodes, choices, profiled, precompile_times=None) -> None:
    if name.startswith("pop_"):
        _TIMINGS[name] = {getattr(c, "name", str(c)): float(t) for c, t in timings.items()}


def _ensure_feedback() -> None:
    from torch._inductor import select_algorithm as sa

    get = getattr(sa, "get_algorithm_selector_cache", None)
    if get is not None and _feedback in getattr(get(), "feedback_saver_fns", []):
        return
    if getattr(_ensure_feedback, "added", False) and get is None:
        return
    sa.add_feedback_saver(_feedback)
    _ensure_feedback.added = True


# ----------------------------------------------------------------------------------------------
# the lowering
# ----------------------------------------------------------------------------------------------


def _is_ir(v) -> bool:
    from torch._inductor.ir import IRNode

    return isinstance(v, IRNode)


def _hinted(node) -> tuple[list[int], list[int]]:
    from torch._inductor.virtualized import V

    sv = V.graph.sizevars
    hint = getattr(sv, "optimization_hint", None) or sv.size_hint
    size = [int(hint(s)) for s in node.get_size()]
    try:
        stride = [int(hint(s)) for s in node.get_stride()]
    except (AttributeError, NotImplementedError):
        stride = list(torch._prims_common.make_contiguous_strides_for(size)) if size else []
    return size, stride


def _symbolic(node) -> bool:
    import sympy

    return any(isinstance(s, sympy.Expr) and not s.is_number for s in node.get_size())


def _shapes_text(tensors: Mapping[str, Any]) -> str:
    dt = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    parts = []
    for name, t in tensors.items():
        if t.dtype.is_floating_point and t.dim() >= 1:
            parts.append(f"{name} {'x'.join(map(str, t.shape))} {dt.get(t.dtype, str(t.dtype))}")
    return ", ".join(parts[:3])


def _lower(ops: OpChoices, overload, *args, **kwargs):
    from torch._inductor.virtualized import V

    names = [a.name for a in overload._schema.arguments]
    bound = {a.name: a.default_value for a in overload._schema.arguments if a.has_default_value()}
    bound.update(zip(names, args))
    bound.update(kwargs)
    code = bound.pop("kernels", TORCH)
    tensors = {n: v for n, v in bound.items() if _is_ir(v)}
    others = {n: v for n, v in bound.items() if n not in tensors}
    with V.fake_mode:  # fakes of the real sizes (symbolic ones at their hints): what ``serves`` reads
        metas = {n: torch.empty_strided(*_hinted(v), dtype=v.get_dtype(), device=v.get_device())
                 for n, v in tensors.items()}
    args_meta = {**others, **metas}
    symbolic = any(_symbolic(v) for v in tensors.values())
    config = getattr(getattr(V.graph, "current_node", None), "meta", {}).get("pop_config")
    shapes = _shapes_text(metas)
    sup = support()
    if not sup["inline"]:
        _record(Decision(ops.qualname, shapes, ops.pick(code, args_meta, True).name,
                         "fallback: this torch cannot inline a traced body (extern op)", config=config))
        return None
    serving = [c for c in ops.choices if (c.any_size or not symbolic) and c.serves(args_meta)]
    if code == AUTO and len(serving) > 1:
        if sup["tune"]:
            out = _tune(ops, serving, tensors, others, args_meta, shapes, config)
            if out is not None:
                return out
        else:
            chosen = ops.pick(AUTO, args_meta, True)
            _record(Decision(ops.qualname, shapes, chosen.name, "fallback: this torch has no autotuner",
                             config=config))
            return _inline(chosen, tensors, others)
    if code == AUTO:
        chosen = serving[0] if serving else ops.pick(AUTO, args_meta, True)
        how = "only choice"
    else:
        chosen = ops.pick(code, args_meta, True)
        if symbolic and not chosen.any_size:
            chosen = ops.pick(TORCH, args_meta, True)
        how = "pinned"
    _record(Decision(ops.qualname, shapes, chosen.name, how, config=config))
    return _inline(chosen, tensors, others)


def _decomposition(choice: Choice, tensor_names: list[str]):
    def decomposition(*tensors, **kw):
        return choice.fn(**dict(zip(tensor_names, tensors)), **kw)

    decomposition.__name__ = choice.name
    return decomposition


def _inline(choice: Choice, tensors: Mapping[str, Any], others: Mapping[str, Any]):
    """Trace ``choice`` over the op's inputs and inline its graph as IR (it fuses with what is around it); None (the
    op stays an extern call) if the trace would add a guard on a symbolic size."""
    from torch._inductor.codegen.subgraph import inline_subgraph_to_ir_nodes
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.ir import ir_node_to_tensor
    from torch._inductor.lowering import validate_ir
    from torch._inductor.virtualized import V
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = functools.partial(_decomposition(choice, list(tensors)), **others)
    shape_env = V.fake_mode.shape_env
    with V.fake_mode:
        fakes = [ir_node_to_tensor(v) for v in tensors.values()]
        guards = shape_env.error_on_new_guards() if shape_env is not None and hasattr(
            shape_env, "error_on_new_guards") else contextlib.nullcontext()
        try:
            with guards:
                gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(*fakes)
        except Exception as e:  # noqa: BLE001 - a guard on a symbolic size: leave the op to its extern call
            if "guard" not in str(e).lower() and type(e).__name__ != "_ShapeEnvGuardError":
                raise
            log.info("autotune: %s adds a guard: extern call", choice.name)
            return None
    out = inline_subgraph_to_ir_nodes(gm, list(tensors.values()), f"pop_{choice.name}")
    validate_ir(out)
    return out


def _input_gen_fns(ops: OpChoices, tensors: Mapping[str, Any], args_meta) -> dict[int, Callable]:
    makers = ops.index_inputs(args_meta) if ops.index_inputs is not None else {}
    out = {}
    for i, (name, node) in enumerate(tensors.items()):
        if name not in makers:
            continue

        def gen(ir, make=makers[name]):
            size, stride = _hinted(ir)
            t = torch.empty_strided(size, stride, dtype=ir.get_dtype(), device=ir.get_device())
            return t.copy_(make(size, ir.get_dtype(), ir.get_device()))

        out[i] = gen
    return out


BENCHMARK_METHOD = "cold-cpu-caches"
"""in every graph's cache key: a graph lowered under another benchmarking method is not reused"""

FLUSH_BYTES = 64 << 20
"""bytes written between two timed calls of a CPU choice: more than this machine's last-level cache (32 MiB)"""


def cold_cpu_time(fn: Callable[[], Any], rep: float = 100.0, min_runs: int = 5, max_runs: int = 50) -> float:
    """Median ms of ``fn()`` with the caches flushed before each call (``FLUSH_BYTES`` written, not timed).

    A decode step reads each layer's weights once, after every other layer's weights went through the caches,
    so they come from DRAM. Inductor's CPU benchmark calls a choice back to back on the same inputs: a layer's
    weights (SmolLM2's int8 gate/up table, 1.7 MB) then sit in L2/L3 and a compute-bound kernel beats a
    bandwidth-bound one that is faster from DRAM (measured: ``pop::values_decode`` ebag 0.131 vs reduce_ebag
    0.166 ms hot, the reverse in generate())."""
    import statistics
    import time

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8)
    fn()
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < rep):
        flush.fill_(len(times) & 1)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def cold_cpu_benchmarks():
    """Inductor's CPU benchmarker times with cold caches (``cold_cpu_time``) while a ``pop::`` op is tuned."""
    try:
        from torch._inductor.runtime.benchmarking import benchmarker
    except ImportError:
        yield
        return
    shadowed = vars(benchmarker).pop("benchmark_cpu", None)  # an instance attribute someone else set, if any
    benchmarker.benchmark_cpu = lambda _callable, warmup=None, rep=None, **_: cold_cpu_time(_callable)
    try:
        yield
    finally:
        del benchmarker.benchmark_cpu
        if shadowed is not None:
            benchmarker.benchmark_cpu = shadowed


def _tune(ops: OpChoices, serving: list[Choice], tensors, others, args_meta, shapes: str, config):
    from torch._dynamo.utils import counters
    from torch._inductor.codegen.subgraph import SubgraphTemplate, inline_subgraph_to_ir_nodes
    from torch._inductor.lowering import validate_ir
    from torch._inductor.select_algorithm import autotune_select_algorithm

    cpu = all(t.get_device() is None or t.get_device().type == "cpu" for t in tensors.values())
    # the timings Inductor caches on disk are keyed by this name: cold-cache timings never meet hot ones
    name = ops.qualname.replace("::", "_") + ("_cold" if cpu else "")
    gen = _input_gen_fns(ops, tensors, args_meta)
    decs = [_decomposition(c, list(tensors)) for c in serving]
    try:
        callers = SubgraphTemplate(name=name).generate_custom_op_choices(
            name=name, decompositions=decs, input_nodes=list(tensors.values()),
            non_tensor_args=[dict(others) for _ in decs], input_gen_fns=gen or None)
    except TypeError as e:  # another signature: this torch's API moved
        log.info("autotune: %s: generate_custom_op_choices: %s", ops.qualname, e)
        return None
    if not callers:
        return None
    label = {c.name: s.name for c, s in zip(callers, serving)} if len(callers) == len(serving) else {
        c.name: c.name.removeprefix(name + "_").rsplit("_", 1)[0] for c in callers}
    _ensure_feedback()
    _TIMINGS.pop(name, None)
    before = counters["inductor"]["select_algorithm_autotune"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # Inductor's benchmark harness
        with cold_cpu_benchmarks() if cpu else contextlib.nullcontext():
            out = autotune_select_algorithm(name, callers, list(tensors.values()), callers[0].layout,
                                            input_gen_fns=gen or None)
    node, winner = out if isinstance(out, tuple) else (out, None)
    times = {label.get(k, k): v * 1.0 for k, v in _TIMINGS.pop(name, {}).items()}
    if winner is None and times:
        best = min(times, key=times.__getitem__)
        winner = next(c for c in callers if label[c.name] == best)
    how = "measured" if counters["inductor"]["select_algorithm_autotune"] > before else "cached"
    chosen = label.get(getattr(winner, "name", ""), "?")
    _record(Decision(ops.qualname, shapes, chosen, how, times, config))
    if winner is not None and getattr(winner, "gm", None) is not None:
        out = inline_subgraph_to_ir_nodes(winner.gm, list(tensors.values()), name)
        validate_ir(out)
        return out
    return node


__all__ = ["AUTO", "BENCHMARK_METHOD", "CODES", "Choice", "Decision", "FLUSH_BYTES", "KernelsPass", "PIN", "TORCH", "TRITON", "choice_code", "clear",
           "cold_cpu_benchmarks", "cold_cpu_time",
           "decisions", "inductor_patches", "install", "pinned", "register", "registry", "run", "support"]
