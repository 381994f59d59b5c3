"""Rewrite a matched dense site's prefill graph: the down projection becomes ``pop::prefill``.

    H = act(up(x)) [· up2(x)]                 # unchanged: dense gate/up over all channels
    y = pop.prefill(H, attention_mask, Wd, bd, W_up…, b_up…, state…)   # was: down(H)

``pop::prefill`` scores the channels, writes the partition and the R ∪ C layouts into the site's state
(placeholders appended after Dynamo's, ``passes.graph.add_state_placeholders``) and returns the FFN output.
"""

from __future__ import annotations

import torch.fx as fx

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx.state import SiteState

from passes.graph import attention_mask_input, pop, replace_down
from passes.match_ffn import SiteMatch
from passes.nodes import val


def rewrite_prefill(gm: fx.GraphModule, m: SiteMatch, st: SiteState, state: dict[str, fx.Node]) -> None:
    g = gm.graph
    cfg = st.config
    w_a, b_a, w_b, b_b = m.weights()
    with g.inserting_before(m.down):
        h = m.h
        if val(h).dim() == 2:  # [B·L, d_ff] -> [B, L, d_ff]: importance is per token of each sequence
            b = g.call_method("size", (m.batch_source, 0))
            h = g.call_method("view", (h, b, -1, m.d_ff))
        y = g.call_function(
            pop.prefill.default,
            (h, attention_mask_input(gm), m.down_weight, m.down_bias, w_a, b_a, w_b, b_b,
             state["wd_norm"], state["rc_idx"], state["wd_norm_c"], state["w_in"], state["b_in"], state["wd_rc"],
             st.sizes.n_keep, st.sizes.n_R, st.sizes.n_C, st.flags,
             cfg.scope == "sequence", cfg.prefill == "pruned"),
        )
    replace_down(g, m, y)
