"""The ``pop`` Dynamo backend: match FFN sites, rewrite them into ``pop::`` ops, lower.

    model.compile(backend="pop", options={"sparsity": 0.5})     # or pop_fx.compile(model, sparsity=0.5)

Dynamo hands the backend its torch-level FX graph (weights are placeholders
whose ``grapharg`` is the real Parameter). Prefill and decode are separate
graphs: a graph whose FFN activations have the token dimension 1 (Dynamo
specializes 1 to a Python int) is a decode graph, any other is a prefill graph.
The backend rewrites a *copy* of the graph (Dynamo keeps reading the original's
placeholders after we return), appends one placeholder per state tensor and
returns a wrapper that passes the real state tensors at every call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from pop_fx.binding import Binder
from pop_fx.config import PopConfig

log = logging.getLogger("pop_fx")


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """Hash of the runtime's source files (``pop_fx`` but its tools, and ``passes``): the passes, the ops and
    the kernels they lower to."""
    import passes

    files = []
    for pkg in (passes, sys.modules[__package__]):
        for d in pkg.__path__:
            files += [f for f in Path(d).rglob("*.py") if "tools" not in f.relative_to(d).parts]
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def passes_uuid(config: PopConfig) -> str:
    """Hash of pop-fx's source and the config: compiled graphs of two configs or two versions never mix."""
    h = hashlib.sha256(_source_hash().encode())
    h.update(repr(sorted(config.as_dict().items())).encode())
    return h.hexdigest()


class CacheKeyPass(CustomGraphPass):
    """Inductor's post-grad custom pass slot, used only for its ``uuid``: Inductor's FX-graph and AOT caches
    key on it, so a graph compiled by one pop-fx version (or config) is never served to another — the
    ``pop::`` ops are decomposed from Python that those caches do not otherwise hash. A pass the user
    already configured still runs, and its uuid joins ours."""

    def __init__(self, uuid: str, inner=None):
        self._uuid = uuid
        self.inner = inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = None if self.inner is None else self.inner.uuid()
        if self.inner is not None and inner is None:
            return None  # the user's pass opted out of caching: so do we
        return (self._uuid, inner)


class PopCompiler:
    """One backend instance per config: matches, rewrites and lowers each graph Dynamo hands it. The rewritten
    graph finds its sites' state from the weights of each call (``pop_fx.binding``), so one compiled graph serves
    every instance Dynamo calls it for."""

    def __init__(self, config: PopConfig):
        self.config = config
        if config.debug:
            debug_log()

    def uuid(self) -> str:
        return passes_uuid(self.config)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        from passes.pipeline import run_passes

        rw = run_passes(gm, self.config)
        linears = 0
        if self.config.lowering == "inductor":
            from passes.rewrite_linear import rewrite_decode_linears
            from pop_fx.ops.linear import MAX_ROWS
            from torch._dynamo.utils import counters

            linears = rewrite_decode_linears(rw.gm, MAX_ROWS)
            counters["pop"]["decode_linears"] += linears
        if self.config.debug:
            for s in rw.skipped:
                log.info("dense %s: %s", s.path, s.reason)
            log.info("before:\n%s", gm.print_readable(print_output=False))
            log.info("after:\n%s", rw.gm.print_readable(print_output=False))
        if not rw.slots:
            fn = self._lower(rw.gm if linears else gm, list(example_inputs), [])
            if not rw.notes:
                return fn
        else:
            # The pop:: ops have no backward (inference only): a graph traced with grad enabled is compiled and run
            # for inference, and its outputs say so if a backward reaches them (never wrong gradients, no crash).
            grad = next((i for i, t in enumerate(example_inputs)
                         if isinstance(t, torch.Tensor) and t.requires_grad), None) if torch.is_grad_enabled() else None
            with torch.no_grad():
                fn = self._lower(rw.gm, list(example_inputs), rw.state_tensors)
            if grad is not None:
                fn = _inference_only(fn, grad)
        bind = Binder(rw.slots, rw.notes, self.config, rw.phase)

        # compile_fx's forward takes unboxed arguments (it only inherits a `_boxed_call` attribute).
        def run(*args):
            return fn(*args, *bind(args))

        return run

    def _lower(self, gm: fx.GraphModule, example_inputs: list, state_tensors: list[torch.Tensor]):
        cfg = self.config
        if cfg.lowering == "eager":
            return gm.forward
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        mode = _fake_mode(example_inputs)
        # Static fakes for the state: real tensors would make their sizes symbolic in the decode kernels.
        inputs = list(example_inputs) + [mode.from_tensor(t, static_shapes=True) for t in state_tensors]
        patches = dict(list_mode_options(cfg.mode)) if cfg.mode not in (None, "default") else {}
        patches.update(cfg.inductor)
        patches["post_grad_custom_post_pass"] = CacheKeyPass(self.uuid(), inductor_config.post_grad_custom_post_pass)
        from pop_fx import autotune  # the kernels pass: the config's code (auto / a family / pins) into every pop:: op

        patches.update(autotune.inductor_patches(cfg, {"post_grad_custom_pre_pass":
                                                       inductor_config.post_grad_custom_pre_pass}))

        def inductor(g: fx.GraphModule, ex: list) -> Callable:
            return compile_fx(g, ex, config_patches=patches)

        if cfg.regional and not patches.get("triton.cudagraphs"):
            from pop_fx.regional import compile_blocks

            from torch._dynamo.utils import counters

            stats: dict[str, int] = {}
            fn = compile_blocks(gm, inputs, inductor, stats)
            if fn is not None:
                counters["pop"]["blocks"] += stats["blocks"]
                counters["pop"]["blocks_compiled"] += stats["compiled"]
                log.info("regional: %d blocks, %d compiled", stats["blocks"], stats["compiled"])
                return fn
        return inductor(gm, inputs)


INFERENCE_ONLY = ("pop-fx is inference-only: the pop:: ops of a compiled model have no backward. Run it under "
                  "torch.no_grad() or torch.inference_mode() (generate() does), or pop_fx.decompile(model) to train")


class _NoBackward(torch.autograd.Function):
    """Identity whose backward raises ``INFERENCE_ONLY``: marks the outputs of a graph run without autograd."""

    @staticmethod
    def forward(ctx, out, anchor):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(INFERENCE_ONLY)


def _inference_only(fn: Callable, anchor: int) -> Callable:
    """Run ``fn`` under no_grad; its floating outputs get a backward that raises ``INFERENCE_ONLY`` (input
    ``anchor`` requires grad, so they require grad as the graph's outputs would)."""

    def mark(t, a):
        return _NoBackward.apply(t, a) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def run(*args):
        with torch.no_grad():
            out = fn(*args)
        a = args[anchor]
        return type(out)(mark(t, a) for t in out) if isinstance(out, (tuple, list)) else mark(out, a)

    return run


def debug_log() -> None:
    """Show the ``pop_fx`` logger's INFO records (the passes' counts, each graph before and after) on stderr;
    ``PopConfig(debug=True)`` calls it, ``logging.getLogger("pop_fx").setLevel(logging.DEBUG)`` shows more."""
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[pop] %(message)s"))
        log.addHandler(h)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def _fake_mode(example_inputs):
    ctx = torch._guards.TracingContext.try_get()
    if ctx is not None and ctx.fake_mode is not None:
        return ctx.fake_mode
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    return mode


def pop_backend(gm: fx.GraphModule, example_inputs: list, *, options: Any = None, mode: str | None = None,
                config: PopConfig | None = None, **_: Any):
    """Dynamo backend entry: ``torch.compile(m, backend="pop", options={...})``; a bad option raises ValueError."""
    cfg = PopConfig.from_options(config if config is not None else options)
    if mode is not None:
        cfg = cfg.replace(mode=mode)
    return PopCompiler(cfg)(gm, example_inputs)


def register() -> None:
    """Make ``backend="pop"`` resolve after ``import pop_fx``.

    When pop-fx is pip-installed, Dynamo finds it through the ``torch_dynamo_backends``
    entry point and loads ``pop_backend`` itself (registering here as well would make that
    load fail as a duplicate); from a source tree without the entry point, register directly.
    """
    from torch._dynamo.backends import registry

    registry._discover_entrypoint_backends()
    if registry._BACKENDS.get("pop") is not None or "pop" in registry._COMPILER_FNS:
        return
    registry.register_backend(pop_backend, name="pop")
