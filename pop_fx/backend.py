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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from pop_fx import state as _state
from pop_fx.config import PopConfig
from pop_fx.partition import partition_sizes
from pop_fx.state import STATE_NAMES


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    gm2 = fx.GraphModule(gm, g)
    gm2.meta = dict(gm.meta)
    return gm2


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
        rw = rewrite_graph(gm, self.config)
        self.last = rw.counts
        if self.config.debug:
            print(f"[pop] graph: {rw.counts}")
            for s in rw.skipped:
                print(f"[pop]   dense {s.path}: {s.reason}")
            print("[pop] before:\n" + gm.print_readable(print_output=False))
            print("[pop] after:\n" + rw.gm.print_readable(print_output=False))
        if not rw.state_tensors:
            return self._lower(gm, list(example_inputs))
        return self._lower(rw.gm, list(example_inputs), rw.state_tensors)

    def _lower(self, gm: fx.GraphModule, example_inputs: list, state_tensors: list[torch.Tensor] | None = None):
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
        # compile_fx's forward takes unboxed arguments (it only inherits a `_boxed_call` attribute).
        def run(*args):
            return fn(*args, *state_tensors)

        return run


@dataclass
class Rewritten:
    gm: fx.GraphModule
    """a rewritten copy of Dynamo's graph (the original is untouched)"""
    sites: list
    skipped: list
    state_tensors: list[torch.Tensor]
    """the real tensors for the placeholders the rewrite appended, in order"""
    counts: dict[str, int]


def rewrite_graph(gm: fx.GraphModule, cfg: PopConfig) -> Rewritten:
    """Match every site of ``gm`` and rewrite a copy: prefill graphs get pop::prefill, decode graphs R∪C + pop::decode."""
    from passes.expert_rewrite import rewrite_experts
    from passes.match_experts import find_experts, site_kinds
    from passes.match_ffn import find_sites
    from passes.match_vision import split_vision_tower
    from passes.pop_rewrite import (add_state_placeholders, n_inputs, proxy_support, rewrite_decode,
                                    rewrite_decode_proxy, rewrite_prefill, site_flags, site_weights)

    if cfg.candidate_proxy is not None and cfg.scope != "batch":
        raise ValueError(f"PopConfig.candidate_proxy={cfg.candidate_proxy!r} with scope={cfg.scope!r}: the compiled "
                         "proxy ops serve scope='batch' only (pop_fx.reference.pruned runs both scopes)")

    gm2 = copy_graph_module(gm)
    sites, skipped = find_sites(gm2)
    sites, vision = split_vision_tower(sites)  # a vision tower runs only in prefill: not a site
    skipped = skipped + vision
    experts, experts_skipped = find_experts(gm2)
    kinds = site_kinds(sites, experts + experts_skipped)  # gated sites beside routed experts are shared experts
    for s in skipped:
        if s.param is not None:
            _state.note(s.param, cfg, None, s.reason, path=s.path)
    state_tensors: list[torch.Tensor] = []
    counts = {"matched": len(sites), "skipped": len(skipped), "prefill": 0, "decode": 0}
    for i, m in enumerate(sites):
        kind = kinds[i]
        sizes = partition_sizes(m.d_ff, cfg.sparsity, cfg.candidate_ratio)
        if sizes.is_dense:
            _state.note(m.param, cfg, kind, "dense: every channel kept (sparsity 0)", path=m.path, matched=True)
            continue
        if sizes.n_keep < 1:
            _state.note(m.param, cfg, kind, f"dense: d_ff={m.d_ff} too small for sparsity={cfg.sparsity} "
                        "(n_keep < 1)", path=m.path, matched=True)
            continue
        w_a, b_a, w_b, b_b = (_real(n) for n in site_weights(m))
        st = _state.get_or_create(m.param, cfg, kind=kind, d_ff=m.d_ff, d_model=m.d_model, flags=site_flags(m),
                                  n_in=n_inputs(m), in_dtype=w_a.dtype,
                                  weights=dict(w_a=w_a, b_a=b_a, w_b=w_b, b_b=b_b))
        st.info.update(pattern=m.pattern.name, activation=m.activation, path=m.path)
        nodes = add_state_placeholders(gm2, st.tensors, f"pop_site{i}")
        graph_kind = "decode" if m.is_decode else "prefill"
        state_tensors.extend(st.tensors[name] for name in STATE_NAMES)
        reason = "pop"
        if m.is_decode and cfg.candidate_proxy is not None:
            sup = proxy_support(m)
            if isinstance(sup, str):  # exact candidate scoring (the paper's) for this site, reported
                reason = f"pop ({sup}: candidates scored exactly)"
                rewrite_decode(gm2, m, st, nodes)
            else:
                gate, act = sup
                w = (w_a, w_b) if gate == 0 else (w_b, w_a)
                tables = st.ensure_proxy(*w)
                proxy_nodes = add_state_placeholders(gm2, tables, f"pop_site{i}_proxy", names=("q", "s"))
                state_tensors.extend(tables[name] for name in ("q", "s"))
                rewrite_decode_proxy(gm2, m, st, nodes, proxy_nodes, act)
        else:
            (rewrite_decode if m.is_decode else rewrite_prefill)(gm2, m, st, nodes)
        st.graphs.add(graph_kind)
        counts[graph_kind] += 1
        _state.note(m.param, cfg, kind, reason, path=m.path, matched=True)
    state_tensors.extend(rewrite_experts(gm2, experts, experts_skipped, cfg, counts))
    gm2.graph.lint()
    gm2.recompile()
    return Rewritten(gm2, sites, skipped, state_tensors, counts)


def _real(node: fx.Node | None) -> torch.Tensor | None:
    """The real tensor behind a weight/bias placeholder (None for a missing bias)."""
    if node is None:
        return None
    ga = node.meta.get("grapharg")
    t = getattr(ga, "example", None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{node.name} is not a graph input with a real tensor")
    return t


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
