"""Helpers for the passes' tests: a tiny model's captured prefill and decode graphs (Dynamo, no Inductor)."""

import torch

from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

FAMILIES = ["llama", "phi3", "gpt2", "opt"]


def capture(name: str, **model_kw):
    """(model, [prefill graph, decode graph]) of a 2-token greedy generate() from a left-padded batch of two."""
    model = tiny_model(name, **model_kw)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding puts the attention mask into the graphs
    return model, capture_graphs(model, ids, mask, max_new_tokens=2)


def linears_reading(gm, params) -> int:
    """Projection nodes (linear/addmm) whose weight placeholder is one of ``params``."""
    from passes.nodes import addmm_parts, linear_parts, param_of

    ids = {id(p) for p in params}
    out = 0
    for n in gm.graph.nodes:
        parts = linear_parts(n) if n.op == "call_function" else None
        parts = parts or (addmm_parts(n) if n.op == "call_function" else None)
        if parts and param_of(parts[1]) is not None and id(param_of(parts[1])) in ids:
            out += 1
    return out


def ffn_params(model):
    """(gate/up weights, down weights) of a model's FFN sites."""
    from pop_fx.sites import find_module_sites

    sites, _ = find_module_sites(model)
    ups, downs = [], []
    for s in sites:
        downs.append(s.down.weight)
        for name, p in s.module.named_parameters():
            # gate/up weights: d_ff (or 2·d_ff fused) output channels; Conv1D stores them [in, out]
            is_up = p.shape[0] in (s.d_ff, 2 * s.d_ff) or (type(s.down).__name__ == "Conv1D" and p.shape[-1] == s.d_ff)
            if p.dim() == 2 and p is not s.down.weight and "weight" in name and is_up:
                ups.append(p)
    return ups, downs
