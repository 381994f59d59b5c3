"""Inspect what POP matches and rewrites in a model's graphs, and what it costs per decode step.

    pop-fx inspect [MODEL] [--html FILE] [--json]
    report = pop_fx.tools.inspect.inspect("llama", PopConfig(sparsity=0.5))

The prefill and decode graphs of a short greedy ``generate()`` are captured
(``pop_fx.tools.capture``) and each is rewritten with ``passes.pipeline.run_passes``
(no Inductor). The report lists every site (module path, kind, pattern,
activation, shapes, |R|/|C|/|P|), every FFN-like block left dense with the
reason, the ``pop::`` ops per graph, and per site the ops between the FFN's
input ``x`` and its output before and after the rewrite, read off the graph
nodes. Costs come from ``pop_fx.tools.costmodel``.

Like a compile, the rewrite registers the sites' POP state on the model's
Parameters (keyed weakly: it goes away with the model).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from pop_fx.tools import costmodel
from pop_fx.config import PopConfig
from pop_fx.partition import partition_sizes

# ----------------------------------------------------------------------------------------------
# reading a site's nodes
# ----------------------------------------------------------------------------------------------


def op_name(n: fx.Node) -> str:
    """A node's operation as a reader knows it: linear, silu, mul, narrow, pop.decode, view..."""
    if n.op == "call_function":
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            return f"{t.namespace}.{t._opname}"
        return getattr(t, "__name__", str(t))
    if n.op in ("call_method", "call_module", "get_attr"):
        return str(n.target)
    return n.name


def short_name(n: fx.Node) -> str:
    """A graph input by what it is: "gate_proj.weight" for a Parameter, "w_in" for POP state, else the node name."""
    if n.meta.get("pop_state"):
        return n.meta["pop_state"]
    name = n.name
    i = name.rfind("_modules_")
    if n.op == "placeholder" and i >= 0:
        module, sep, param = name[i + len("_modules_"):].partition("_parameters_")
        if sep:
            return f"{module}.{param.strip('_')}"
    return name


def is_pop_op(n: fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "pop"


def nodes_between(x: fx.Node, out: fx.Node) -> list[fx.Node]:
    """The nodes on some path from ``x`` to ``out`` (``x`` excluded, ``out`` included), in graph order."""
    ancestors, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n not in ancestors:
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    between, stack = set(), [x]
    while stack:
        n = stack.pop()
        if n in between or n not in ancestors:
            continue
        between.add(n)
        stack.extend(n.users)
    between.discard(x)
    return [n for n in out.graph.nodes if n in between]


@dataclass
class OpNode:
    """One node of a site's subgraph."""

    name: str
    op: str
    """the operation: linear, silu, mul, pop.decode..."""
    args: list[str]
    """arguments as text; a node of the subgraph by its name"""
    inputs: list[str]
    """names of the subgraph's nodes and of the inputs this node reads (edges)"""
    shape: list[int] | None = None
    pop: bool = False

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "args": self.args, "inputs": self.inputs, "shape": self.shape,
                "pop": self.pop}


@dataclass
class SiteOps:
    """The ops of one site in one graph: the chain a reader follows, and the nodes/inputs to draw."""

    text: str
    nodes: list[OpNode]
    inputs: list[str]
    """the subgraph's inputs: "x" first, then weights and POP state by short name"""

    def as_dict(self) -> dict:
        return {"text": self.text, "nodes": [n.as_dict() for n in self.nodes], "inputs": self.inputs}


class _Kw(tuple):
    """A keyword argument (name, value), told apart from a tuple argument."""


def _arg_list(n: fx.Node) -> list:
    return list(n.args) + [_Kw((k, v)) for k, v in n.kwargs.items()]


def _shape(n: fx.Node, rewritten: bool) -> list | None:
    # A rewritten graph's untouched nodes keep Dynamo's example_value of the dense width: only shapes
    # propagated through the rewritten graph (tensor_meta) are true there.
    if rewritten:
        tm = n.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
    else:
        v = n.meta.get("example_value", n.meta.get("val"))
        shape = v.shape if isinstance(v, torch.Tensor) else None
    return None if shape is None else [int(s) if isinstance(s, int) else str(s) for s in shape]


def propagate_shapes(gm: fx.GraphModule, example_inputs: list, state_tensors: list) -> bool:
    """Run the rewritten graph once on the captured inputs to record every node's true shape (tensor_meta)."""
    from torch.fx.passes.shape_prop import ShapeProp

    if any(not isinstance(a, (torch.Tensor, int, float, bool)) for a in example_inputs):
        return False
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs, *state_tensors)
    except Exception:  # noqa: BLE001 - shapes are a nicety of the report; a failure only hides them
        return False
    return True


def site_ops(x: fx.Node, out: fx.Node, rewritten: bool = False) -> SiteOps:
    """Read the subgraph from the FFN input ``x`` to ``out`` (the down projection, or the pop op that replaced it).

    ``rewritten``: the graph went through the rewrite, so shapes come from ``propagate_shapes`` (or are omitted).
    """
    nodes = nodes_between(x, out)
    inside = set(nodes)
    # A value read twice is named by its position among such values (%0, %1): texts of equal sites compare equal.
    shared = {n: f"%{i}" for i, n in enumerate(n for n in nodes if sum(u in inside for u in n.users) > 1)}
    shown: set[fx.Node] = set()

    def ref(a: fx.Node) -> str:
        return "x" if a is x else (shared.get(a, f"%{a.name}") if a in inside else short_name(a))

    def arg_text(a, pred: fx.Node | None) -> str:
        if isinstance(a, _Kw):
            return f"{a[0]}={arg_text(a[1], pred)}"
        if isinstance(a, fx.Node):
            if a is pred:
                return "·"
            if a in inside and a not in shown:
                return call_text(a, None)
            return ref(a)
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg_text(v, pred) for v in a) + "]"
        if isinstance(a, torch.dtype):
            return str(a).replace("torch.", "")
        return repr(a)

    def call_text(n: fx.Node, pred: fx.Node | None) -> str:
        shown.add(n)
        args = _arg_list(n)
        text = op_name(n) if len(args) == 1 and args[0] is pred and pred is not None else \
            f"{op_name(n)}({', '.join(arg_text(a, pred) for a in args)})"
        return f"{shared[n]} = {text}" if n in shared else text

    # The main path: from the output back along each node's first argument that lies inside.
    path, n = [], out
    while n is not None:
        path.append(n)
        n = next((a for a in n.all_input_nodes if a in inside), None)
    path.reverse()
    parts, pred = [], None
    for n in path:
        parts.append(call_text(n, pred))
        pred = n
    # Nodes off the main path that nothing inside reads (none in the known patterns) still get shown.
    parts.extend(call_text(n, None) for n in nodes if n not in shown)

    op_nodes, inputs = [], ["x"]
    for n in nodes:
        reads = []
        for a in n.all_input_nodes:
            name = ref(a)
            reads.append(a.name if a in inside else name)
            if a not in inside and name not in inputs:
                inputs.append(name)
        op_nodes.append(OpNode(n.name, op_name(n), [_plain(a, x) for a in _arg_list(n)], reads,
                               _shape(n, rewritten), is_pop_op(n)))
    return SiteOps(" -> ".join(parts), op_nodes, inputs)


def _plain(a, x: fx.Node) -> str:
    if isinstance(a, _Kw):
        return f"{a[0]}={_plain(a[1], x)}"
    if isinstance(a, fx.Node):
        return "x" if a is x else (a.name if a.op != "placeholder" else short_name(a))
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_plain(v, x) for v in a) + "]"
    return repr(a)


def _replacement(m) -> fx.Node:
    """In a rewritten graph: the node standing where the site's down projection was."""
    g = m.h.graph
    if m.down in set(g.nodes):  # not rewritten (sparsity 0, d_ff too small)
        return m.down
    frontier = [m.h]
    for _ in range(4):  # h [-> view] -> pop op [-> flatten]
        nxt = []
        for n in frontier:
            for u in n.users:
                if is_pop_op(u):
                    flat = [w for w in u.users if w.op == "call_function" and w.target is torch.flatten]
                    return flat[0] if len(flat) == 1 else u
                nxt.append(u)
        frontier = nxt
    raise RuntimeError(f"{m.path}: the down projection was removed but no pop:: op reads its input")


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------


@dataclass
class SiteReport:
    """One site as seen across the captured graphs."""

    path: str
    kind: str
    pattern: str
    activation: str
    d_model: int
    d_ff: int
    n_keep: int
    n_R: int
    n_C: int
    n_P: int
    rewritten: list[str] = field(default_factory=list)
    """graph kinds ("prefill", "decode") in which the site became pop:: ops"""
    reason: str = ""
    """what the backend recorded for it: "pop", or why it stays dense"""
    ops: dict[str, dict[str, SiteOps]] = field(default_factory=dict)
    """graph kind -> {"before": ..., "after": ...}"""

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("path", "kind", "pattern", "activation", "d_model", "d_ff", "n_keep", "n_R",
                                           "n_C", "n_P", "rewritten", "reason")}
        d["ops"] = {g: {w: o.as_dict() for w, o in v.items()} for g, v in self.ops.items()}
        return d


@dataclass
class GraphReport:
    index: int
    kind: str
    """"prefill" or "decode" (from the sites' token count), "other" for a graph without FFN sites"""
    nodes_before: int
    nodes_after: int
    counts: dict[str, int]
    pop_ops: dict[str, int]
    sites: list[str]
    skipped: list[dict]

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class InspectReport:
    model: str
    config: dict
    batch: int
    prompt_len: int
    graphs: list[GraphReport]
    sites: list[SiteReport]
    skipped: list[dict]
    """FFN-like blocks left dense: path, reason, graph kinds"""
    costs: dict

    def as_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "batch": self.batch, "prompt_len": self.prompt_len,
                "graphs": [g.as_dict() for g in self.graphs], "sites": [s.as_dict() for s in self.sites],
                "skipped": self.skipped, "costs": self.costs}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)

    def to_html(self) -> str:
        from pop_fx.tools.html_report import render

        return render(self)

    def __str__(self) -> str:
        return format_text(self)


def _prompt(model: torch.nn.Module, batch: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 256))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(4, vocab - 1), vocab, (batch, prompt_len), generator=g)
    return ids.to(model.device), torch.ones_like(ids)


def inspect(model_or_name: Any = "smollm2", config: PopConfig | dict | None = None, *, prompt_len: int = 8,
            batch: int = 1, dtype: str | torch.dtype = torch.float32) -> InspectReport:
    """Capture a short generate's graphs, rewrite each (no Inductor) and report sites, skips, ops and costs."""
    from passes.match_ffn import match_ffns
    from passes.graph import pop_ops_in

    from pop_fx import state as _state
    from passes.pipeline import run_passes
    from pop_fx.tools.capture import capture_graphs
    from pop_fx.tools.models import load_model

    cfg = PopConfig.from_options(config).replace(lowering="eager")  # rewrite only; the lowering is never run
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 2:
        raise ValueError(f"prompt_len={prompt_len!r} is invalid: allowed an integer >= 2 (1 would look like decode)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} is invalid: allowed an integer >= 1")
    if isinstance(model_or_name, torch.nn.Module):
        model, name = model_or_name, type(model_or_name).__name__
    else:
        model, _ = load_model(model_or_name, dtype=dtype)
        name = f"{model_or_name} ({type(model).__name__})"
    ids, mask = _prompt(model, batch, prompt_len)
    captured = capture_graphs(model, ids, mask, max_new_tokens=2)

    sites: dict[int, SiteReport] = {}
    skipped: dict[tuple[str, str], dict] = {}
    graphs: list[GraphReport] = []
    for i, c in enumerate(captured):
        before = {id(m.param): m for m in match_ffns(c.gm)[0]}
        rw = run_passes(c.gm, cfg)
        propagate_shapes(rw.gm, c.example_inputs, rw.state_tensors)
        kinds = {("decode" if m.is_decode else "prefill") for m in rw.sites}
        gkind = kinds.pop() if len(kinds) == 1 else "other"
        for m in rw.sites:
            key = id(m.param)
            if key not in sites:
                sz = partition_sizes(m.d_ff, cfg.sparsity, cfg.candidate_ratio)
                sites[key] = SiteReport(m.path, m.kind, m.pattern.name, m.activation, m.d_model, m.d_ff, sz.n_keep,
                                        sz.n_R, sz.n_C, sz.n_P)
            s = sites[key]
            out = _replacement(m)
            if is_pop_op(out) or any(is_pop_op(a) for a in out.all_input_nodes):
                s.rewritten.append(gkind)
            s.reason = _state.notes_of(m.param).get(cfg, {}).get("reason", "")
            b = before[key]
            s.ops[gkind] = {"before": site_ops(b.sources[0].x, b.down), "after": site_ops(m.sources[0].x, out, rewritten=True)}
        for sk in rw.skipped:
            entry = skipped.setdefault((sk.path, sk.reason), {"path": sk.path, "reason": sk.reason, "graphs": []})
            entry["graphs"].append(gkind)
        graphs.append(GraphReport(i, gkind, len(c.gm.graph.nodes), len(rw.gm.graph.nodes), dict(rw.counts),
                                  pop_ops_in(rw.gm), [m.path for m in rw.sites],
                                  [{"path": s.path, "reason": s.reason} for s in rw.skipped]))
    site_list = list(sites.values())
    return InspectReport(name, cfg.as_dict(), batch, prompt_len, graphs, site_list, list(skipped.values()),
                         cost_summary(site_list, cfg, batch))


def cost_summary(sites: list[SiteReport], cfg: PopConfig, batch: int = 1) -> dict:
    """The cost model's expressions for the site kinds present, and its numbers summed over the model's sites."""
    kinds = sorted({"plain" if s.kind == "plain" else "gated" for s in sites}) or ["gated"]
    exprs = {k: {name: str(e) for name, e in costmodel.expressions(k).items()} for k in kinds}
    per_site = [costmodel.site_cost(s.kind, s.d_model, s.d_ff, cfg.sparsity, cfg.candidate_ratio, batch) for s in sites]
    total = {
        "dense_flops": sum(c.dense_flops for c in per_site),
        "pop_flops": sum(c.pop_flops for c in per_site),
        "static_flops": sum(c.static_flops for c in per_site),
        "dense_bytes": {p: sum(c.dense_bytes[p] for c in per_site) for p in costmodel.BYTES_PER_ELEMENT},
        "pop_bytes": {p: sum(c.pop_bytes[p] for c in per_site) for p in costmodel.BYTES_PER_ELEMENT},
    }
    if per_site:
        total["flops_ratio"] = total["pop_flops"] / total["dense_flops"]
        total["overhead"] = (total["pop_flops"] - total["static_flops"]) / total["dense_flops"]
    return {
        "symbols": {k: str(v) for k, v in costmodel.SYMBOLS.items()},
        "domain": costmodel.DOMAIN,
        "sizes": {k: str(v) for k, v in costmodel.sizes().items()},
        "expressions": exprs,
        "overhead_general": {k: str(costmodel.overhead_general(k)) for k in kinds},
        "batch": batch,
        "sites": len(per_site),
        "total": total,
        "paper": costmodel.paper_comparison(cfg.candidate_ratio if cfg.candidate_ratio > 0 else 0.1),
        "paper_note": costmodel.PAPER_NOTE,
    }


# ----------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def format_text(rep: InspectReport) -> str:
    c = rep.config
    lines = [f"pop-fx inspect: {rep.model}; r={c['sparsity']} γ={c['candidate_ratio']} scope={c['scope']} "
             f"prefill={c['prefill']}; prompt {rep.batch}×{rep.prompt_len}, 2 new tokens"]
    lines.append("graphs:")
    for g in rep.graphs:
        ops = ", ".join(f"pop::{k}×{v}" for k, v in sorted(g.pop_ops.items())) or "no pop:: ops"
        lines.append(f"  #{g.index} {g.kind:8s} {g.counts['matched']} sites matched, {g.counts['skipped']} left dense; "
                     f"{ops}; {g.nodes_before} -> {g.nodes_after} nodes")
    lines.append(f"sites ({len(rep.sites)}):")
    hdr = f"  {'path':32s} {'kind':11s} {'pattern':16s} {'act':9s} {'d_model':>7s} {'d_ff':>6s} {'keep':>6s} " \
          f"{'|R|':>6s} {'|C|':>6s} {'|P|':>6s}  rewritten in"
    lines.append(hdr)
    for s in rep.sites:
        lines.append(f"  {s.path:32s} {s.kind:11s} {s.pattern:16s} {s.activation:9s} {s.d_model:7d} {s.d_ff:6d} "
                     f"{s.n_keep:6d} {s.n_R:6d} {s.n_C:6d} {s.n_P:6d}  {','.join(s.rewritten) or '-'}"
                     + ("" if s.reason in ("pop", "") else f"  ({s.reason})"))
    lines.append(f"left dense ({len(rep.skipped)}):" + ("" if rep.skipped else " none"))
    for k in rep.skipped:
        lines.append(f"  {k['path']:32s} {k['reason']}  [{','.join(k['graphs'])}]")
    # Sites whose ops read the same (same kind, layer-independent weight names) are shown once.
    groups: dict[tuple, list[str]] = {}
    for s in rep.sites:
        sig = tuple((g, w, o.text) for g, v in sorted(s.ops.items()) for w, o in v.items())
        groups.setdefault(sig, []).append(s.path)
    lines.append("ops per site (from the graph nodes, x = the FFN's input):")
    for sig, paths in groups.items():
        more = f" (and {len(paths) - 1} more sites with the same ops)" if len(paths) > 1 else ""
        lines.append(f"  {paths[0]}{more}")
        for g, w, text in sig:
            lines.append(f"    {g:7s} {w:6s}: {text}")
    lines.extend(_cost_lines(rep.costs))
    return "\n".join(lines)


def _cost_lines(costs: dict) -> list[str]:
    lines = [f"cost per decode step (matmul FLOPs, FFN weights read; b sequences; on {costs['domain']}):"]
    lines.append("  sizes: " + ", ".join(f"{k} = {v}" for k, v in costs["sizes"].items()))
    for kind, ex in costs["expressions"].items():
        lines.append(f"  {kind}:")
        for k in ("dense_flops", "pop_flops", "dense_bytes", "pop_bytes", "flops_ratio", "overhead"):
            lines.append(f"    {k:12s} = {ex[k]}")
        lines.append(f"    overhead for every r, γ = {costs['overhead_general'][kind]}")
    t = costs["total"]
    if costs["sites"]:
        lines.append(f"  this model ({costs['sites']} sites, batch {costs['batch']}): FLOPs {_si(t['dense_flops'], 'FLOP')} "
                     f"dense -> {_si(t['pop_flops'], 'FLOP')} POP ({t['flops_ratio']:.3f}×); weights read "
                     f"fp32 {_si(t['dense_bytes']['fp32'], 'B')} -> {_si(t['pop_bytes']['fp32'], 'B')}, "
                     f"bf16 {_si(t['dense_bytes']['bf16'], 'B')} -> {_si(t['pop_bytes']['bf16'], 'B')}; "
                     f"candidate-region overhead {100 * t['overhead']:.2f}% of dense FFN FLOPs")
    lines.append("  candidate-region overhead vs the paper (20% total reduction; r from pop_fx.tools.budget):")
    lines.append(f"    {'model':12s} {'r':>6s} {'paper':>7s} {'ours':>7s} {'γ/3':>7s} {'vs static':>9s} {'vs layer':>9s}")
    for p in costs["paper"]:
        lines.append(f"    {p['model']:12s} {p['sparsity']:6.3f} {100 * p['paper']:6.2f}% {100 * p['ours_dense_ffn']:6.2f}% "
                     f"{100 * p['symbolic']:6.2f}% {100 * p['vs_static_ffn']:8.2f}% {100 * p['vs_decoder_layer']:8.2f}%")
    lines.extend("    " + ln for ln in costs["paper_note"].splitlines())
    return lines


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", nargs="?", metavar="MODEL", help="same as --model (this one wins)")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens of the captured generate (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the captured generate (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.cli import config_from_args

    rep = inspect(args.model_name or args.model, config_from_args(args), prompt_len=args.prompt_len,
                  batch=args.batch, dtype=args.dtype)
    print(rep.to_json() if args.json else str(rep))
    if args.html:
        from pathlib import Path

        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rep.to_html(), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


__all__ = ["InspectReport", "SiteOps", "SiteReport", "inspect", "nodes_between", "site_ops"]
