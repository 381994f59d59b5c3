"""Rewrite a matched dense site's decode graph (one token per sequence).

scope="batch"::

    z = linear(x, state.w_in[, state.b_in])   # was: up(x) [and up2(x)] over all d_ff channels (b_in iff a bias)
    g, u = z[..., :n_RC], z[..., n_RC:]       # gated only (fused gate_up keeps its chunk)
    H_rc = act(g) [· u]                       # the same elementwise nodes, now n_R + n_C wide
    y = pop.decode(H_rc, state.wd_rc, bd, state.wd_norm_c, n_R, n_select)   # was: down(H)

scope="sequence": gate/up stay dense over all channels (one GEMM for the batch) and ``pop.decode_seq``
selects each sequence's candidates from its own R ∪ C and projects down.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx.state import SiteState

from passes.graph import erase_dead, first_of, pop, replace_down
from passes.match_ffn import SiteMatch


def rewrite_decode(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node]) -> None:
    g = gm.graph
    sizes = st.sizes
    n_rc = sizes.n_R + sizes.n_C
    per_seq = st.config.scope == "sequence"
    src0 = m.sources[0]
    x = src0.x
    if per_seq:
        # Gate/up stay dense (one GEMM serves the batch; per-sequence copies would not fit in memory);
        # selection and the down projection are per sequence.
        with g.inserting_before(m.down):
            y = g.call_function(pop.decode_seq.default,
                                (m.h, m.down_weight, m.down_bias, state["wd_norm"], state["rc_idx"],
                                 sizes.n_R, sizes.n_select, st.flags, st.config.kernel_code))
        replace_down(g, m, y)
        return
    # 1. gate/up over R ∪ C only: one projection over the contiguous layout replaces the site's one or two.
    anchor = first_of(g, [s.proj for s in m.sources])
    _, b_a, _, b_b = m.weights()
    b_in = state["b_in"] if (b_a is not None or b_b is not None) else None  # no bias: a plain mm, not addmm(0, …)
    with g.inserting_before(anchor):
        z = g.call_function(torch._C._nn.linear, (x, state["w_in"], b_in))
    if m.kind == "fused_gated":
        src0.proj.replace_all_uses_with(z)  # the chunk(2) that follows still splits gate | up
    elif m.kind == "gated":
        with g.inserting_after(z):
            parts = [g.call_function(torch.narrow, (z, -1, i * n_rc, n_rc)) for i in range(2)]
        for s, p in zip(m.sources, parts):
            s.leaf.replace_all_uses_with(p)
    elif src0.conv1d:
        src0.proj.replace_all_uses_with(z)
        v = src0.view_after  # its target shape names d_ff explicitly: narrow it to |R ∪ C|
        args = list(v.args)
        if len(args) == 2 and isinstance(args[1], (tuple, list)):
            args[1] = type(args[1])(list(args[1])[:-1] + [n_rc])
        else:
            args[-1] = n_rc
        v.args = tuple(args)
    else:
        src0.leaf.replace_all_uses_with(z)
    erase_dead(g, [n for s in m.sources for n in (s.leaf, s.proj) if n is not z])
    # Chunk getitems of a fused projection were leaves: they stay (they now split z).
    # 2. down over R ∪ selected candidates.
    with g.inserting_before(m.down):
        y = g.call_function(pop.decode.default,
                            (m.h, state["wd_rc"], m.down_bias, state["wd_norm_c"], sizes.n_R, sizes.n_select,
                             st.config.kernel_code))
    replace_down(g, m, y)
