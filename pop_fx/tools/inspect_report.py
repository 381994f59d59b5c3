"""The report ``pop-fx inspect`` builds, and its text form (``html_report`` renders the same objects as HTML).

Data only: ``pop_fx.tools.inspect`` fills these from captured graphs; nothing here reads a graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


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
    choices: list[dict] = field(default_factory=list)
    """per decode op and shapes: the implementation Inductor's autotuner chose (``pop_fx.autotune.Decision``:
    op, shapes, choice, how, times_ms — its benchmark time of every choice)"""

    def as_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "batch": self.batch, "prompt_len": self.prompt_len,
                "graphs": [g.as_dict() for g in self.graphs], "sites": [s.as_dict() for s in self.sites],
                "skipped": self.skipped, "costs": self.costs, "choices": self.choices}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)

    def __str__(self) -> str:
        return format_text(self)


def format_si(x: float, unit: str) -> str:
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
    lines.extend(choice_lines(rep.choices))
    lines.extend(_cost_lines(rep.costs))
    return "\n".join(lines)


def choice_lines(choices: list[dict]) -> list[str]:
    """Which implementation each decode op got, and the benchmark times Inductor measured for every choice."""
    if not choices:
        return []
    lines = ["implementation per decode op (Inductor's autotuner, kernels='auto'; its benchmark, ms):"]
    for c in choices:
        times = ", ".join(f"{k} {v:.4g}" for k, v in sorted(c["times_ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"  {c['op']:20s} {c['shapes']}: {c['choice']} ({c['how']}{'; ' + times if times else ''})")
    return lines


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
        lines.append(f"  this model ({costs['sites']} sites, batch {costs['batch']}): FLOPs {format_si(t['dense_flops'], 'FLOP')} "
                     f"dense -> {format_si(t['pop_flops'], 'FLOP')} POP ({t['flops_ratio']:.3f}×); weights read "
                     f"fp32 {format_si(t['dense_bytes']['fp32'], 'B')} -> {format_si(t['pop_bytes']['fp32'], 'B')}, "
                     f"bf16 {format_si(t['dense_bytes']['bf16'], 'B')} -> {format_si(t['pop_bytes']['bf16'], 'B')}; "
                     f"candidate-region overhead {100 * t['overhead']:.2f}% of dense FFN FLOPs")
    paper = ", ".join(f"{p['model']} +{100 * p['paper']:.2f}%" for p in costs["paper"])
    lines.append(f"  the paper reports {paper} at γ = 0.1 ({costs['paper_note']})")
    return lines


__all__ = ["GraphReport", "InspectReport", "OpNode", "SiteOps", "SiteReport", "choice_lines", "format_si", "format_text"]
