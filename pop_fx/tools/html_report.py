"""One self-contained HTML page of an InspectReport: tables, the cost summary, a site's graph as inline SVG.

No external resources (inline CSS, hand-drawn SVG: boxes for nodes, arrows for edges, a layered layout),
so the page opens anywhere, offline, and a test can render it in a headless browser.
"""

from __future__ import annotations

from html import escape

from pop_fx.tools.inspect_report import InspectReport, SiteOps, format_si

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d1d1f; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px/1.4 ui-monospace, monospace; } pre { white-space: pre-wrap; background: #f7f7f7; padding: 8px; }
.chain code { display: block; } .muted { color: #666; }
.graphs { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.graphs figure { margin: 0; border: 1px solid #ddd; padding: 8px; overflow-x: auto; max-width: 100%; }
figcaption { font-weight: 600; margin-bottom: 6px; }
svg text { font: 11px ui-monospace, monospace; }
"""

_FILL = {"x": "#d8f0d8", "param": "#ececec", "state": "#dce8f8", "op": "#ffffff", "pop": "#ffd9a8"}
_ROW, _BOX_H, _GAP, _CHAR = 70, 36, 16, 7.0


def _box_width(lines: list[str]) -> float:
    return max(70.0, _CHAR * max(len(s) for s in lines) + 16)


def svg_graph(ops: SiteOps, state_names: set[str] | None = None) -> str:
    """The subgraph as an SVG: inputs on top, each op one layer below its deepest input, arrows for edges."""
    state_names = state_names or set()
    op_names = {n.name for n in ops.nodes}
    layer: dict[str, int] = {}
    for n in ops.nodes:  # graph order is topological
        layer[n.name] = 1 + max((layer[i] for i in n.inputs if i in op_names), default=0)
    consumers: dict[str, list[int]] = {}
    for n in ops.nodes:
        for i in n.inputs:
            if i not in op_names:
                consumers.setdefault(i, []).append(layer[n.name])
    for name in ops.inputs:
        layer[name] = 0 if name == "x" else max(0, min(consumers.get(name, [1])) - 1)
    boxes: dict[str, dict] = {}
    for name in ops.inputs:
        kind = "x" if name == "x" else ("state" if name in state_names else "param")
        boxes[name] = {"lines": [name], "kind": kind}
    for n in ops.nodes:
        lines = [n.op] + ([f"[{', '.join(map(str, n.shape))}]"] if n.shape else [])
        boxes[n.name] = {"lines": lines, "kind": "pop" if n.pop else "op"}
    rows: dict[int, list[str]] = {}
    for name in list(ops.inputs) + [n.name for n in ops.nodes]:
        rows.setdefault(layer[name], []).append(name)
    width = 0.0
    for lv, names in rows.items():
        x = _GAP
        for name in names:
            b = boxes[name]
            b["w"] = _box_width(b["lines"])
            b["x"], b["y"] = x, _GAP + lv * _ROW
            x += b["w"] + _GAP
        width = max(width, x)
    height = _GAP + (max(rows) + 1) * _ROW
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for n in ops.nodes:
        dst = boxes[n.name]
        for i in dict.fromkeys(n.inputs):
            src = boxes[i]
            x1, y1 = src["x"] + src["w"] / 2, src["y"] + _BOX_H
            x2, y2 = dst["x"] + dst["w"] / 2, dst["y"]
            if layer[i] < layer[n.name]:
                mid = (y1 + y2) / 2
                d = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"
            else:  # same layer (cannot happen in a DAG laid out this way; drawn anyway rather than dropped)
                d = f"M{x1:.1f},{y1:.1f} L{x2:.1f},{y2:.1f}"
            out.append(f'<path d="{d}" fill="none" stroke="#555" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for name, b in boxes.items():
        stroke = "#c46a00" if b["kind"] == "pop" else "#888"
        out.append(f'<g class="node {b["kind"]}"><title>{escape(name)}</title>'
                   f'<rect x="{b["x"]:.1f}" y="{b["y"]:.1f}" width="{b["w"]:.1f}" height="{_BOX_H}" rx="5" '
                   f'fill="{_FILL[b["kind"]]}" stroke="{stroke}"/>')
        for k, text in enumerate(b["lines"]):
            ty = b["y"] + (14 if len(b["lines"]) > 1 else 22) + 13 * k
            out.append(f'<text x="{b["x"] + b["w"] / 2:.1f}" y="{ty:.1f}" text-anchor="middle">{escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _td(v, num: bool = False) -> str:
    return f'<td class="num">{escape(str(v))}</td>' if num else f"<td>{escape(str(v))}</td>"


def render(rep: InspectReport) -> str:
    from pop_fx.state import STATE_NAMES

    c = rep.config
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>pop-fx inspect: {escape(rep.model)}</title>", f"<style>{CSS}</style></head><body>",
         f"<h1>pop-fx inspect: {escape(rep.model)}</h1>",
         f'<p>r = {c["sparsity"]}, γ = {c["candidate_ratio"]}, scope = {escape(c["scope"])}, prefill = '
         f'{escape(c["prefill"])}; graphs of a greedy generate of {rep.batch}×{rep.prompt_len} prompt tokens + 2 new '
         f'tokens, rewritten with <code>passes.pipeline.run_passes</code> (no Inductor).</p>']

    h.append('<h2>Graphs</h2><table id="graphs"><tr><th>#</th><th>kind</th><th>sites</th><th>left dense</th>'
             "<th>pop:: ops</th><th>nodes before → after</th></tr>")
    for g in rep.graphs:
        ops = ", ".join(f"pop::{k} × {v}" for k, v in sorted(g.pop_ops.items())) or "none"
        h.append(f'<tr class="graph">{_td(g.index, True)}{_td(g.kind)}{_td(g.counts["matched"], True)}'
                 f'{_td(g.counts["skipped"], True)}{_td(ops)}{_td(f"{g.nodes_before} → {g.nodes_after}")}</tr>')
    h.append("</table>")

    h.append(f'<h2>Sites ({len(rep.sites)})</h2><table id="sites"><tr><th>path</th><th>kind</th><th>pattern</th>'
             "<th>activation</th><th>d_model</th><th>d_ff</th><th>n_keep</th><th>|R|</th><th>|C|</th><th>|P|</th>"
             "<th>rewritten in</th><th>backend</th></tr>")
    for s in rep.sites:
        h.append(f'<tr class="site">{_td(s.path)}{_td(s.kind)}{_td(s.pattern)}{_td(s.activation)}'
                 + "".join(_td(v, True) for v in (s.d_model, s.d_ff, s.n_keep, s.n_R, s.n_C, s.n_P))
                 + f'{_td(", ".join(s.rewritten) or "-")}{_td(s.reason)}</tr>')
    h.append("</table>")

    h.append(f'<h2>Left dense ({len(rep.skipped)})</h2>')
    if rep.skipped:
        h.append('<table id="skipped"><tr><th>path</th><th>reason</th><th>graphs</th></tr>')
        for k in rep.skipped:
            h.append(f'<tr class="skipped">{_td(k["path"])}{_td(k["reason"])}{_td(", ".join(k["graphs"]))}</tr>')
        h.append("</table>")
    else:
        h.append('<p class="muted">No FFN-like block was left dense.</p>')

    h.append("<h2>Ops per site, before and after the rewrite</h2>"
             '<p class="muted">Read off the graph nodes between the FFN input <code>x</code> and its output; '
             "· is the previous op's result, %name a value used twice.</p>")
    groups: dict[tuple, list[str]] = {}
    for s in rep.sites:
        sig = tuple((g, w, o.text) for g, v in sorted(s.ops.items()) for w, o in v.items())
        groups.setdefault(sig, []).append(s.path)
    h.append('<table id="ops"><tr><th>sites</th><th>graph</th><th>ops</th></tr>')
    for sig, paths in groups.items():
        first = True
        for g, w, text in sig:
            cell = f'<td rowspan="{len(sig)}">{escape(", ".join(paths))}</td>' if first else ""
            first = False
            h.append(f'<tr class="ops">{cell}{_td(f"{g} {w}")}<td class="chain"><code>{escape(text)}</code></td></tr>')
    h.append("</table>")

    if rep.sites:
        s = rep.sites[0]
        h.append(f"<h2>Graph of {escape(s.path)}</h2>"
                 '<p class="muted">Gray: weights; blue: POP state; green: the FFN input; orange: pop:: ops.</p>')
        for gkind in ("decode", "prefill"):
            if gkind not in s.ops:
                continue
            h.append('<div class="graphs">')
            for when in ("before", "after"):
                h.append(f'<figure class="site-graph" data-graph="{gkind}" data-when="{when}">'
                         f"<figcaption>{gkind} graph, {when} the rewrite</figcaption>"
                         f"{svg_graph(s.ops[gkind][when], set(STATE_NAMES))}</figure>")
            h.append("</div>")

    h.append(_cost_html(rep.costs))
    h.append("</body></html>")
    return "\n".join(h)


def _cost_html(costs: dict) -> str:
    h = ['<h2 id="cost">Cost per decode step</h2>',
         "<p>Symbols: d = d_model, f = d_ff, r = sparsity, γ = candidate ratio, b = sequences (one token each), "
         "s = bytes per weight element. Counted: the FFN's matmul FLOPs (2 per multiply-add) and the FFN weight bytes "
         f"read per step. Domain: {escape(costs['domain'])}.</p>",
         '<table id="sizes"><tr><th>size</th><th>expression</th></tr>']
    h += [f"<tr>{_td(k)}<td><code>{escape(v)}</code></td></tr>" for k, v in costs["sizes"].items()]
    h.append("</table>")
    for kind, ex in costs["expressions"].items():
        h.append(f'<table class="expressions" data-kind="{escape(kind)}"><tr><th colspan="2">{escape(kind)} FFN</th></tr>')
        for k in ("dense_flops", "pop_flops", "dense_bytes", "pop_bytes", "flops_ratio", "overhead"):
            h.append(f"<tr>{_td(k)}<td><code>{escape(ex[k])}</code></td></tr>")
        h.append(f"<tr>{_td('overhead, every r and γ')}<td><code>{escape(costs['overhead_general'][kind])}</code></td></tr>")
        h.append("</table>")
    t = costs["total"]
    if costs["sites"]:
        h.append(f'<table id="totals"><tr><th colspan="3">this model: {costs["sites"]} sites, batch {costs["batch"]}'
                 "</th></tr><tr><th></th><th>dense</th><th>POP</th></tr>"
                 f"<tr>{_td('FLOPs')}{_td(format_si(t['dense_flops'], 'FLOP'), True)}{_td(format_si(t['pop_flops'], 'FLOP'), True)}</tr>"
                 + "".join(f"<tr>{_td(f'weights read, {p}')}{_td(format_si(t['dense_bytes'][p], 'B'), True)}"
                           f"{_td(format_si(t['pop_bytes'][p], 'B'), True)}</tr>" for p in t["dense_bytes"])
                 + f"<tr>{_td('POP / dense FLOPs')}<td colspan=\"2\" class=\"num\">{t['flops_ratio']:.4f}</td></tr>"
                 f"<tr>{_td('candidate-region overhead')}<td colspan=\"2\" class=\"num\">"
                 f"{100 * t['overhead']:.2f}% of dense FFN FLOPs</td></tr></table>")
    h.append('<h3>Candidate-region overhead next to the paper (20% total reduction)</h3>'
             '<table id="paper"><tr><th>model</th><th>d_model</th><th>d_ff</th><th>r</th><th>paper</th>'
             "<th>ours (exact sizes)</th><th>γ/3</th><th>vs static-mask FFN</th><th>vs decoder layer</th></tr>")
    for p in costs["paper"]:
        r = f"{p['sparsity']:.3f}"
        h.append(f"<tr>{_td(p['model'])}{_td(p['d_model'], True)}{_td(p['d_ff'], True)}{_td(r, True)}"
                 + "".join(_td(f"{100 * p[k]:.2f}%", True) for k in ("paper", "ours_dense_ffn", "symbolic",
                                                                      "vs_static_ffn", "vs_decoder_layer"))
                 + "</tr>")
    h.append(f'</table><p class="note">{escape(costs["paper_note"])}</p>')
    return "\n".join(h)


__all__ = ["render", "svg_graph"]
