"""Rewrite a matched gated site's decode graph for proxy-scored candidates (``PopConfig.candidate_proxy``).

    sel = pop.proxy_select(x, q, s, rc_idx, wd_norm_c, …)   # C ranked from the low-precision copy
    z   = pop.gather_in(x, w_in, b_in, sel, …)              # exact gate/up over R ∪ chosen only
    H   = act(z[:, :n_keep]) · z[:, n_keep:]                # the graph's own activation nodes
    y   = pop.decode_sel(H, wd_rc, bd, sel, n_R, n_C)        # was: down(H)

``passes.match_ffn.proxy_support`` says which sites qualify (separate gate and up projections, a known activation, the gate
identifiable); the others keep the paper's exact candidate scoring and the report says why.

``candidate_proxy="int8-values"`` (``rewrite_decode_values``) replaces the whole FFN instead:

    y   = pop.values_decode(x, q, s, wd_t, wd, bd, rc_idx, wd_norm_c, …)   # was: down(act(gate(x)) · up(x))
"""

from __future__ import annotations

import torch
import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx.state import SiteState

from passes.graph import erase_dead, first_of, pop, replace_down
from passes.match_ffn import SiteMatch


def rewrite_decode_proxy(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node],
                         proxy: dict[str, fx.Node], act: int) -> None:
    """Decode with proxy-scored candidates: rank C from the int8 copy, then gate/up/down over R ∪ chosen only."""
    g = gm.graph
    sizes = st.sizes
    n_rc, n_keep = sizes.n_R + sizes.n_C, sizes.n_keep
    x = m.sources[0].x
    _, b_a, _, b_b = m.weights()
    b_in = state["b_in"] if (b_a is not None or b_b is not None) else None
    anchor = first_of(g, [s.proj for s in m.sources])
    with g.inserting_before(anchor):
        sel = g.call_function(pop.proxy_select.default, (x, proxy["q"], proxy["s"], state["rc_idx"],
                                                         state["wd_norm_c"], sizes.n_R, sizes.n_select, st.d_ff, act))
        z = g.call_function(pop.gather_in.default, (x, state["w_in"], b_in, sel, sizes.n_R, n_rc, 2))
        parts = [g.call_function(torch.narrow, (z, -1, i * n_keep, n_keep)) for i in range(2)]
    for s, p in zip(m.sources, parts):
        s.leaf.replace_all_uses_with(p)
    erase_dead(g, [n for s in m.sources for n in (s.leaf, s.proj)])
    with g.inserting_before(m.down):
        y = g.call_function(pop.decode_sel.default, (m.h, state["wd_rc"], m.down_bias, sel, sizes.n_R, sizes.n_C))
    replace_down(g, m, y)


def rewrite_decode_values(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node],
                          proxy: dict[str, fx.Node], act: int) -> None:
    """candidate_proxy="int8-values": the site's gate, up, activation and down nodes become one pop.values_decode."""
    g = gm.graph
    sizes = st.sizes
    x = m.sources[0].x
    with g.inserting_before(m.down):
        y = g.call_function(pop.values_decode.default, (x, proxy["q"], proxy["s"], proxy["wd_t"], m.down_weight,
                                                        m.down_bias, state["rc_idx"], state["wd_norm_c"], sizes.n_R,
                                                        sizes.n_select, st.d_ff, act))
    replace_down(g, m, y)
    # The region (activation, product, the gate/up projections) is now dead.
    erase_dead(g, [*m.region, m.h, *(n for s in m.sources for n in (s.leaf, s.proj))])
