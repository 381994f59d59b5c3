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
import sys
from typing import Any

import torch
import torch.fx as fx

from pop_fx.tools import costmodel
from pop_fx.config import PopConfig
from pop_fx.partition import partition_sizes
from pop_fx.tools.html_report import render
from pop_fx.tools.inspect_report import GraphReport, InspectReport, OpNode, SiteOps, SiteReport

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
        inputs = {n: j for j, n in enumerate(n for n in rw.gm.graph.nodes if n.op == "placeholder")}
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
            s.reason = next((n.reason for n in rw.notes if n.index == inputs[m.down_weight] and n.graph == gkind), "")
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
        path.write_text(render(rep), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


__all__ = ["InspectReport", "SiteOps", "SiteReport", "inspect", "nodes_between", "site_ops"]
