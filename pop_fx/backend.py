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
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from pop_fx import state as _state
from pop_fx.config import PopConfig


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
    """One backend instance per config: matches, rewrites and lowers each graph Dynamo hands it."""

    def __init__(self, config: PopConfig):
        self.config = config
        self.last: dict[str, Any] = {}

    def uuid(self) -> str:
        return passes_uuid(self.config)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        from passes.pipeline import run_passes

        rw = run_passes(gm, self.config)
        self.last = rw.counts
        if self.config.debug:
            print(f"[pop] graph: {rw.counts}")
            for s in rw.skipped:
                print(f"[pop]   dense {s.path}: {s.reason}")
            print("[pop] before:\n" + gm.print_readable(print_output=False))
            print("[pop] after:\n" + rw.gm.print_readable(print_output=False))
        if not rw.state_tensors:
            return self._lower(gm, list(example_inputs))
        return self._lower(rw.gm, list(example_inputs), rw.state_tensors, rw.states, rw.phase)

    def _lower(self, gm: fx.GraphModule, example_inputs: list, state_tensors: list[torch.Tensor] | None = None,
               states: list | None = None, phase: str = "prefill"):
        cfg = self.config
        state_tensors = state_tensors or []
        if cfg.lowering == "eager":
            fn = gm.forward
        else:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            fakes = []
            if state_tensors:
                fake_mode = _fake_mode(example_inputs)
                fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in state_tensors]
            from torch._inductor import config as inductor_config

            patches = dict(list_mode_options(cfg.mode)) if cfg.mode not in (None, "default") else {}
            patches["post_grad_custom_post_pass"] = CacheKeyPass(self.uuid(), inductor_config.post_grad_custom_post_pass)
            fn = compile_fx(gm, example_inputs + fakes, config_patches=patches)
        if not state_tensors:
            return fn
        states = list({id(s): s for s in states or []}.values())  # one entry per state, in order
        before_graph = _state.before_graph

        # compile_fx's forward takes unboxed arguments (it only inherits a `_boxed_call` attribute).
        def run(*args):
            before_graph(states, phase)
            return fn(*args, *state_tensors)

        return run


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


def warn_once(msg: str, _seen: set = set()) -> None:  # noqa: B006 - the set is the once-only memory
    if msg not in _seen:
        _seen.add(msg)
        warnings.warn(msg, stacklevel=3)
