"""Find POP sites (FFN blocks) in Dynamo's torch-level FX graph.

A site is found from its *down projection*: a ``linear`` (or GPT-2's Conv1D
``addmm``) whose weight is a model Parameter and whose input ``H`` is produced
by a purely elementwise region (the activation, and for gated FFNs the
product) fed by one or two *up projections* of the same input ``x``. The
shapes of the weights, not module names, are the evidence; the module path
from ``nn_module_stack`` is only used to name the site in reports.

PATTERNS is the table a reader scans: what each pattern matches, as a rewrite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from passes.nodes import (activation_name, addmm_parts, elementwise_kind, input_name, is_activation, is_view,
                          linear_parts, module_path, param_of, token_input, val)


# ----------------------------------------------------------------------------------------------
# sources (up projections) and the site
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One up projection feeding the activation region."""

    leaf: fx.Node
    """the node the region reads (linear output, Conv1D's view, or a chunk getitem)"""
    proj: fx.Node
    """the projection node (linear or addmm)"""
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    conv1d: bool = False
    chunk_index: int | None = None
    view_after: fx.Node | None = None


@dataclass
class SiteMatch:
    pattern: "Pattern"
    down: fx.Node
    down_weight: fx.Node
    down_bias: fx.Node | None
    h: fx.Node
    h_views: list[fx.Node]
    region: list[fx.Node]
    sources: list[Source]
    d_ff: int
    d_model: int
    conv1d: bool
    activation: str
    path: str
    param: torch.Tensor
    tokens: object
    """tokens per sequence in this graph (an int 1 in decode graphs: Dynamo specializes 1)"""
    batch_source: fx.Node | None = None
    """for a token-flattened activation [B·L, d_ff] (OPT): the [B, L, ...] input that gives B"""
    cached: bool = True
    """the graph reads a KV cache (``passes.classify_graph``); False in the first forward of a one-token prompt"""

    @property
    def kind(self) -> str:
        return self.pattern.kind

    @property
    def is_decode(self) -> bool:
        """One token per sequence on a non-empty cache (docs/spec.md): a one-token prompt's first forward is a prefill."""
        t = self.tokens
        return isinstance(t, int) and t == 1 and self.cached

    @property
    def flags(self) -> int:
        """``pop_fx.ops`` layout flags: FUSED for a fused gate_up, CONV1D for GPT-2's [in, out] weights."""
        from pop_fx.ops.layout import CONV1D, FUSED

        return (FUSED if self.kind == "fused_gated" else 0) | (CONV1D if self.conv1d else 0)

    @property
    def n_inputs(self) -> int:
        """Gate/up weight blocks per channel: 2 for gated kinds, 1 for plain."""
        return 2 if self.kind in ("gated", "fused_gated") else 1

    def weights(self):
        """(w_a, b_a, w_b, b_b) graph nodes in the order ``pop_fx.ops`` lays them out."""
        s = self.sources
        if self.kind == "gated":
            return s[0].weight, s[0].bias, s[1].weight, s[1].bias
        return s[0].weight, s[0].bias, None, None


@dataclass
class Skipped:
    """An FFN-like block left dense, with the reason the report shows."""

    path: str
    reason: str
    weight: fx.Node | None = None
    """the placeholder of its down weight (the report's key), if it has one"""

    @property
    def param(self) -> torch.Tensor | None:
        return param_of(self.weight)


class NoMatch(Exception):
    """Raised inside matching with the reason an FFN-like block is left dense."""


def _source_of(a: fx.Node, d_ff: int) -> Source | None:
    """If ``a`` is the output of an up projection to d_ff channels, describe it."""
    lp = linear_parts(a)
    if lp is not None:
        x, w, b = lp
        wv = param_of(w)
        if wv is not None and wv.dim() == 2 and wv.shape[0] == d_ff:
            return Source(a, a, x, w, b)
        return None
    if is_view(a) and isinstance(a.args[0], fx.Node):
        mm = addmm_parts(a.args[0])
        if mm is not None:
            x, w, b = mm
            wv = param_of(w)
            if wv is not None and wv.dim() == 2 and wv.shape[1] == d_ff:
                return Source(a, a.args[0], x, w, b, conv1d=True, view_after=a)
        return None
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        ch = a.args[0]
        is_chunk = (ch.op == "call_method" and ch.target == "chunk") or (ch.op == "call_function" and ch.target is torch.chunk)
        if not is_chunk:
            return None
        chunks = ch.args[1] if len(ch.args) > 1 else ch.kwargs.get("chunks")
        dim = ch.args[2] if len(ch.args) > 2 else ch.kwargs.get("dim", 0)
        lin = ch.args[0]
        lp = linear_parts(lin) if isinstance(lin, fx.Node) else None
        if chunks != 2 or dim not in (-1, len(val(lin).shape) - 1 if val(lin) is not None else -1) or lp is None:
            return None
        x, w, b = lp
        wv = param_of(w)
        if wv is not None and wv.dim() == 2 and wv.shape[0] == 2 * d_ff:
            return Source(a, lin, x, w, b, chunk_index=int(a.args[1]))
    return None


def _scalar_ok(a) -> bool:
    return a is None or isinstance(a, (int, float, bool, str, torch.dtype))


def match_site(down: fx.Node) -> SiteMatch | Skipped | None:
    """Match the FFN whose down projection is ``down``; None if ``down`` is no projection of a Parameter."""
    lp = linear_parts(down)
    conv1d = False
    if lp is not None:
        hin, w, b = lp
        wv = param_of(w)
        if wv is None or wv.dim() != 2:
            return None
        d_ff = wv.shape[1]
    else:
        mm = addmm_parts(down)
        if mm is None:
            return None
        hin, w, b = mm
        wv = param_of(w)
        if wv is None or wv.dim() != 2:
            return None
        d_ff = wv.shape[0]
        conv1d = True
    path = module_path(down)
    try:
        m = _match_from(down, hin, w, b, wv, d_ff, conv1d, path)
    except NoMatch as e:
        return Skipped(path, str(e), w)
    return m


def _match_from(down, hin, w, b, wv, d_ff, conv1d, path) -> SiteMatch | None:
    # H may sit behind shape-only views (GPT-2 flattens tokens before addmm).
    h_views = []
    h = hin
    while is_view(h) and len(h.users) == 1:
        h_views.append(h)
        h = h.args[0]
    hv = val(h)
    if hv is None or hv.shape[-1] != d_ff:
        return None
    # Walk back through the elementwise region to the up projections. A node that is not a
    # channel-wise op stops the walk there; whether that makes a *skipped FFN* or *no FFN at all*
    # is decided below from what the walk met (norms, residual adds and LM heads are no FFNs).
    region, sources, seen, frontier = [], [], set(), [h]
    failures: list[str] = []
    unknown_only = True  # every failure is an op the passes do not know, between projections (no reduction, no input)
    projected = False  # a projection feeds the region (a source, or a linear of something else than a Parameter)
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        src = _source_of(n, d_ff)
        if src is not None:
            sources.append(src)
            continue
        if n.op == "placeholder":
            if param_of(n) is None:
                return None  # the region reads the residual stream or another graph's result: not an FFN here
            failures.append(f"{input_name(n)} (a per-channel tensor) meets the activation: only elementwise ops "
                            "with scalar arguments are channel-wise")
            unknown_only = False
            continue
        kind = elementwise_kind(n)
        nv = val(n)
        if kind is None:
            failures.append(f"{n.op} {getattr(n.target, '__name__', n.target)} between the up and down projections is not a known elementwise op")
            if linear_parts(n) is not None or addmm_parts(n) is not None:
                projected = True  # an up projection, though not of a Parameter (a scaled or dequantized weight)
            # Keep walking through a shape-preserving unknown op (not a projection): an activation behind it
            # makes this a skipped FFN rather than no FFN at all.
            elif nv is not None and tuple(nv.shape) == tuple(hv.shape):
                frontier.extend(a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, fx.Node))
                region.append(n)
            continue
        if nv is None or tuple(nv.shape) != tuple(hv.shape):
            failures.append(f"{n.name} changes the activation's shape (broadcast or reduction): not channel-wise")
            unknown_only = False
            continue
        bad = [a for a in list(n.args) + list(n.kwargs.values()) if not isinstance(a, fx.Node) and not _scalar_ok(a)]
        if bad:
            failures.append(f"{n.name} takes a non-scalar argument {bad[0]!r}")
            unknown_only = False
            continue
        frontier.extend(a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, fx.Node))
        region.append(n)
    if not sources and not projected:
        return None  # nothing projects into the region
    if not any(is_activation(n) for n in region) and not (sources and failures and unknown_only):
        # No activation: an FFN only if an op the passes do not know sits between an up projection of a
        # Parameter and the down one (sin, softsign: left dense and reported); else a scale or a low-rank pair.
        return None
    if failures:
        raise NoMatch(failures[0])
    if not sources:
        raise NoMatch("no up projection of a Parameter feeds the activation")
    # The region and the sources must feed nothing but the site: the rewrite changes their width.
    inside = set(region) | {s.leaf for s in sources}
    allowed = inside | set(h_views) | {down}
    for n in region:
        for u in n.users:
            if u not in allowed:
                raise NoMatch(f"intermediate {n.name} is also used outside the FFN ({u.name})")
    for s in sources:
        for u in s.leaf.users:
            if u not in allowed:
                raise NoMatch(f"up projection {s.leaf.name} is also used outside the FFN ({u.name})")
    batch_source = None
    if hv.dim() == 3:
        tokens = hv.shape[-2]
    elif hv.dim() == 2:
        # Tokens flattened into rows (OPT): the model's [B, L] input tells B and L.
        batch_source = token_input(down.graph)
        if batch_source is None:
            raise NoMatch(f"activation has shape {tuple(hv.shape)} and the graph has no input_ids/inputs_embeds "
                          "to tell batch from tokens")
        tokens = val(batch_source).shape[1]
    else:
        raise NoMatch(f"activation has shape {tuple(hv.shape)}, not [batch, tokens, d_ff]")
    xs = {s.x for s in sources}
    if len(xs) != 1:
        raise NoMatch("the up projections read different inputs")
    for pat in PATTERNS:
        if pat.applies(sources, conv1d):
            d_model = param_of(sources[0].weight).shape[0 if sources[0].conv1d else 1]
            # Region nodes in graph order, so a copy can replay them.
            order = {n: i for i, n in enumerate(down.graph.nodes)}
            region.sort(key=order.__getitem__)
            sources.sort(key=lambda s: (order[s.leaf]))
            return SiteMatch(pat, down, w, b, h, h_views, region, sources, d_ff, d_model, conv1d,
                             activation_name(region), path.rsplit(".", 1)[0] if "." in path else path, param_of(w),
                             tokens, batch_source)
    raise NoMatch(f"up projections of shapes {[tuple(param_of(s.weight).shape) for s in sources]} fit no pattern")


# ----------------------------------------------------------------------------------------------
# the pattern table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str
    rewrite: str
    """the rewrite, one line: dense form -> POP form"""
    applies: Callable[[list[Source], bool], bool] = field(repr=False, compare=False)


def _one(kind_ok):
    return lambda srcs, conv1d: len(srcs) == 1 and kind_ok(srcs[0], conv1d)


PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "PlainLinear", "plain",
        "linear(act(linear(x, W1, b1)), W2, b2) -> decode: pop.decode(act(linear(x, W1[R∪C], b1[R∪C])), W2ᵀ[R∪C])",
        _one(lambda s, conv1d: not s.conv1d and s.chunk_index is None and not conv1d),
    ),
    Pattern(
        "PlainConv1D", "plain",
        "addmm(b2, act(addmm(b1, x, W1)), W2) -> decode: pop.decode(act(linear(x, W1ᵀ[R∪C], b1[R∪C])), W2[R∪C])",
        _one(lambda s, conv1d: s.conv1d and conv1d),
    ),
    Pattern(
        "GatedLinear", "gated",
        "linear(act(linear(x, Wg)) * linear(x, Wu), Wd) (either operand order) -> decode: one linear(x, [Wg;Wu][R∪C]) split, act·mul, pop.decode",
        lambda srcs, conv1d: len(srcs) == 2 and not conv1d and all(not s.conv1d and s.chunk_index is None for s in srcs),
    ),
    Pattern(
        "FusedGatedLinear", "fused_gated",
        "linear(act(g) * u, Wd) with g, u = chunk(linear(x, Wgu), 2) -> decode: chunk(linear(x, Wgu[R∪C, d_ff+R∪C])), pop.decode",
        lambda srcs, conv1d: len(srcs) == 2 and not conv1d and srcs[0].proj is srcs[1].proj
        and {s.chunk_index for s in srcs} == {0, 1},
    ),
)


def gate_source(m: SiteMatch) -> int | None:
    """Which of a gated site's two sources passes through the activation (the gate), or None if unclear."""
    if m.kind != "gated" or len(m.sources) != 2:
        return None
    region = set(m.region)

    def reach(start: fx.Node) -> set:
        seen, stack = set(), [start]
        while stack:
            for u in stack.pop().users:
                if u in region and u not in seen:
                    seen.add(u)
                    stack.append(u)
        return seen

    r0, r1 = (reach(s.leaf) for s in m.sources)
    acts = (any(is_activation(n) for n in r0 - r1), any(is_activation(n) for n in r1 - r0))
    return {(True, False): 0, (False, True): 1}.get(acts)


def proxy_support(m: SiteMatch) -> tuple[int, int] | str:
    """(gate source index, activation code) of a site the candidate proxy handles, or why not."""
    from pop_fx.activations import ACTIVATIONS

    if m.kind != "gated":
        return f"candidate_proxy: {m.kind} site (gated FFNs with separate gate and up projections only)"
    if m.activation not in ACTIVATIONS:
        return f"candidate_proxy: activation {m.activation} not one of {', '.join(ACTIVATIONS)}"
    gate = gate_source(m)
    if gate is None:
        return "candidate_proxy: cannot tell the gate projection from the up projection"
    return gate, ACTIVATIONS.index(m.activation)


def match_ffns(gm: fx.GraphModule) -> tuple[list[SiteMatch], list[Skipped]]:
    """Every site in the graph (in graph order) and every FFN-like block left dense, with its reason."""
    sites, skipped = [], []
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        r = match_site(n)
        if isinstance(r, SiteMatch):
            sites.append(r)
        elif isinstance(r, Skipped):
            skipped.append(r)
    # A fused gate_up is itself a linear whose "input" is never an activation; nothing else to filter.
    return sites, skipped

