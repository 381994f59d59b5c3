"""Every ``linear`` of a decode-sized input becomes ``pop::linear`` (its implementation measured by Inductor).

Runs after the FFN passes on the graph they return, so it sees what they left: attention projections, the LM head,
FFNs left dense (all of them at sparsity 0) and POP's own exact gate/up over R ∪ C. A linear qualifies when its
input's rows (every dim but the last) are static and number at most ``pop_fx.ops.linear.MAX_ROWS``: a decode step,
or the LM head under ``logits_to_keep=1``. A prefill of symbolic or many rows keeps Inductor's GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from passes.nodes import linear_parts, val


def static_rows(x_node) -> int | None:
    """The static number of rows of a linear's input, or None (symbolic, not a float tensor)."""
    x = val(x_node)
    if x is None or not x.dtype.is_floating_point or x.dim() < 1:
        return None
    dims = x.shape[:-1]
    if any(not isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def rewrite_decode_linears(gm: fx.GraphModule, max_rows: int) -> int:
    """Replace each qualifying ``linear(x, w, b)`` node by ``pop.linear(x, w, b)``; returns how many."""
    import pop_fx.ops.linear  # noqa: F401  (registers pop::linear)

    count = 0
    for n in list(gm.graph.nodes):
        parts = linear_parts(n)
        if parts is None:
            continue
        x, w, b = parts
        rows = static_rows(x)
        wv = val(w)
        if rows is None or rows < 1 or rows > max_rows or wv is None or wv.dim() != 2:
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.pop.linear.default, (x, w, b))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


__all__ = ["static_rows", "rewrite_decode_linears"]
