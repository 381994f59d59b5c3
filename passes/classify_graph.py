"""Tell a decode step from the first forward of a one-token prompt: does the graph read a KV cache?

docs/spec.md: one new token per sequence is a decode step, except the very first forward of a generation
(a one-token prompt), which is a prefill and partitions from its own token. Dynamo traces that first
forward as a graph of its own, because nothing is cached yet: its attention's keys come from this
forward alone (a DynamicCache has no past keys yet; a StaticCache creates its buffers inside the graph).
So the rule is static, read off the graph at compile time — no host sync, no per-step check.

Evidence, in order:
* ``scaled_dot_product_attention``: its key argument depends on a 4-D tensor input (not a Parameter)
  shaped like the keys, [B, ·, S, head_dim] — the cached keys;
* no SDPA but a softmax over 4-D scores (eager attention; a router's 2-D softmax is not one): some 4-D
  floating tensor input whose name does not say "mask";
* no attention at all (an FFN compiled alone): nothing to tell, so one token is a decode step.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.nodes import param_of, val


def _is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and "scaled_dot_product_attention" in str(getattr(n.target, "__name__", n.target))


def _is_softmax(n: fx.Node) -> bool:
    t = n.target
    return (n.op == "call_function" and t in (torch.softmax, torch.nn.functional.softmax)) or (
        n.op == "call_method" and t == "softmax")


def _tensor_input(n: fx.Node) -> torch.Tensor | None:
    """The example value of a non-Parameter tensor placeholder, else None."""
    if n.op != "placeholder":
        return None
    v = val(n)
    try:
        is_param = param_of(n) is not None
    except AssertionError:  # Dynamo's weak reference to a temporary input has expired: not a Parameter
        is_param = False
    return None if v is None or is_param else v


def _reads_cached_keys(key: fx.Node) -> bool:
    kv = val(key)
    if kv is None or kv.dim() != 4:
        return True  # cannot tell: keep the one-token-is-decode rule
    seen, stack = set(), [key]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        v = _tensor_input(n)
        if v is not None and v.dim() == 4 and v.is_floating_point() and v.shape[0] == kv.shape[0] \
                and v.shape[-1] == kv.shape[-1]:
            return True
        stack.extend(n.all_input_nodes)
    return False


def reads_kv_cache(gm: fx.GraphModule) -> bool:
    """True if this graph's attention reads cached keys (or the graph has no attention): see the module doc."""
    nodes = list(gm.graph.nodes)
    sdpa = [n for n in nodes if _is_sdpa(n)]
    if sdpa:
        return any(_reads_cached_keys(n.args[1] if len(n.args) > 1 else n.kwargs["key"]) for n in sdpa)
    # Attention's softmax is over 4-D scores [B, heads, L, S]; a router's (MoE) is over 2-D logits: not attention.
    if any(_is_softmax(n) and (v := val(n)) is not None and v.dim() == 4 for n in nodes):
        return any((v := _tensor_input(n)) is not None and v.dim() == 4 and v.is_floating_point()
                   and "mask" not in n.name for n in nodes)
    return True


__all__ = ["reads_kv_cache"]
