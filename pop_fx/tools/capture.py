"""Capture the FX graphs Dynamo hands a backend: for the passes' tests and the inspection tooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.graph import copy_graph_module


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list


def capture_graphs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   max_new_tokens: int = 2, dynamic: bool | None = None, **generate_kwargs) -> list[Captured]:
    """The Dynamo graphs of one short greedy ``generate()`` (prefill first, then decode), run dense.

    The model is compiled in place only for the call and restored afterwards; ``dynamic`` is
    ``torch.compile``'s (True: sizes symbolic from the first graph, as after a recompile on a new shape).
    """
    graphs: list[Captured] = []

    def backend(gm, example_inputs, **_):
        # A copy keeps each placeholder's `grapharg` (the real Parameter): Dynamo drops it from the original.
        graphs.append(Captured(copy_graph_module(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    previous = model._compiled_call_impl
    model.compile(backend=backend, dynamic=dynamic)
    try:
        with torch.no_grad():
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
                           **generate_kwargs)
    finally:
        model._compiled_call_impl = previous
        torch._dynamo.reset()
    return graphs
