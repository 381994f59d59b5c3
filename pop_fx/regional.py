"""Compile each distinct repeated block of a graph once: one compiled decoder layer serves every layer.

Dynamo hands the backend one graph for the whole model, and Inductor's cost grows with its size: a decoder of
N identical layers is N copies of one layer's graph (SmolLM2: 30). ``compile_blocks`` splits the graph at the
layers (the elements of a ``ModuleList``, read off ``nn_module_stack``), compiles each distinct layer graph
once, calls it for every layer with that layer's inputs (its weights, its KV cache, its POP state) and
compiles the glue around them (embedding, rotary tables, final norm, LM head) apart.

Why not PyTorch's regional-compilation recipe (``layer.compile()`` for each layer): a Hugging Face decoder
layer reads its KV cache as ``cache.layers[self.layer_idx]``, and Dynamo guards on ``layer_idx``, so every
layer recompiles (a 6-layer Llama hits Dynamo's recompile limit of 8 within one ``generate()``). Splitting
Dynamo's own graph keeps one Dynamo frame and one set of guards, and works the same through every entry point.

What it costs: a Python call per block at run time, and no fusion across a block boundary (the residual add
that ends a layer and the norm that starts the next one run as two kernels).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.fx as fx

_ELEMENT = re.compile(r"\.\d+$")


def block_of(n: fx.Node) -> str | None:
    """The outermost module of a node that is an element of a ``ModuleList`` ("L['self'].model.layers.3"), or None."""
    stack = n.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        if _ELEMENT.search(path):
            return path
    return None


def partition(gm: fx.GraphModule) -> dict[fx.Node, int] | None:
    """Partition ids in graph order: one per run of a block's nodes, one per run of glue between blocks. None when
    the graph has fewer than two blocks (nothing to share)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    tags = [block_of(n) for n in nodes]
    if len({t for t in tags if t is not None}) < 2:
        return None
    # A node with no module (a size expression, a cache bookkeeping op) between two nodes of one block is the block's.
    i = 0
    while i < len(nodes):
        if tags[i] is not None:
            i += 1
            continue
        j = i
        while j < len(nodes) and tags[j] is None:
            j += 1
        if 0 < i and j < len(nodes) and tags[i - 1] == tags[j]:
            tags[i:j] = [tags[j]] * (j - i)
        i = j
    ids, pid, last = {}, -1, object()
    for n, t in zip(nodes, tags):
        if t != last or t is None and pid < 0:
            pid += 1
            last = t
        ids[n] = pid
    return ids


_SYMBOL = re.compile(r"\b[su]\d+\b")


class _Keys:
    """Hashable descriptions of a block's values. Size symbols are renamed in order of first appearance: Dynamo
    gives each layer's KV cache a symbol of its own (s84, s87, ...), and a block compiled for one is valid for
    another (Inductor reads every size off the inputs it is called with, and checks them)."""

    def __init__(self):
        self.names: dict[str, str] = {}

    def sym(self, v: Any) -> str:
        return _SYMBOL.sub(lambda m: self.names.setdefault(m.group(0), f"z{len(self.names)}"), str(v))

    def value(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(map(self.sym, v.shape)), tuple(map(self.sym, v.stride())), str(v.dtype),
                    str(v.device), v.requires_grad)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("S", self.sym(v))
        return ("V", repr(v))

    def arg(self, a: Any, idx: dict[fx.Node, int]) -> Any:
        if isinstance(a, fx.Node):
            return ("N", idx[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(self.arg(x, idx) for x in a))
        if isinstance(a, dict):
            return ("D", tuple((k, self.arg(v, idx)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("SL", self.arg(a.start, idx), self.arg(a.stop, idx), self.arg(a.step, idx))
        return self.value(a)


def signature(gm: fx.GraphModule) -> tuple:
    """Two blocks with equal signatures compute the same function of their inputs, in the same input order: same
    ops and arguments node for node, inputs of the same shapes (size symbols up to renaming), strides and dtypes."""
    keys = _Keys()
    idx: dict[fx.Node, int] = {}
    out = []
    for n in gm.graph.nodes:
        idx[n] = len(idx)
        if n.op == "placeholder":
            out.append(("P", keys.value(n.meta.get("example_value", n.meta.get("val")))))
        elif n.op == "get_attr":
            out.append(("A", keys.value(getattr(gm, n.target, None))))
        else:
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__qualname__", repr(n.target))
            mod = getattr(n.target, "__module__", "")
            out.append((n.op, mod, target, keys.arg(n.args, idx), keys.arg(n.kwargs, idx)))
    return tuple(out)


def _call_directly(split: fx.GraphModule, node: fx.Node, fn: Callable, single: bool) -> fx.Node:
    """Make the split graph call the compiled block as a plain function (no nn.Module call per layer); a block that
    returned one value gets it back out of the tuple compiled functions return."""

    def block(*args):
        return fn(*args)[0] if single else fn(*args)

    g = split.graph
    with g.inserting_before(node):
        call = g.call_function(block, node.args, node.kwargs)
    node.replace_all_uses_with(call)
    g.erase_node(node)
    split.delete_submodule(node.target)
    return call


def compile_blocks(gm: fx.GraphModule, example_inputs: list, compile_one: Callable[[fx.GraphModule, list], Callable],
                   stats: dict | None = None) -> Callable | None:
    """Compile ``gm`` block by block with ``compile_one(submodule, example_inputs)``, each distinct block once.

    Returns the split graph (a callable over ``gm``'s inputs), or None when ``gm`` has no repeated blocks.
    ``stats`` (optional) receives the number of blocks and of distinct compiled graphs.
    """
    ids = partition(gm)
    if ids is None:
        return None
    from torch.fx.passes.split_module import split_module

    split = split_module(gm, None, lambda n: ids[n], keep_original_order=True)
    _as_dynamo_graphs(gm, split)
    mode = _fake_mode(example_inputs)
    env: dict[fx.Node, Any] = {}
    originals = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, orig, ex in zip((n for n in split.graph.nodes if n.op == "placeholder"), originals, example_inputs):
        env[ph] = _fake(ex, orig, mode)
    compiled: dict[tuple, Callable] = {}
    n_blocks = 0
    for node in split.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op != "call_module":  # a getitem of a block's outputs
            env[node] = node.target(*args, **kwargs)
            continue
        sub = getattr(split, node.target)
        single = _single_output(sub)
        key = signature(sub)
        n_blocks += 1
        if key not in compiled:
            compiled[key] = compile_one(sub, list(args))
        with mode:
            out = sub(*args, **kwargs)  # the block's outputs as fakes: the next blocks' example inputs
        env[_call_directly(split, node, compiled[key], single)] = out[0] if single else out
    split.recompile()
    if stats is not None:
        stats.update(blocks=n_blocks, compiled=len(compiled))
    return split


def _as_dynamo_graphs(gm: fx.GraphModule, split: fx.GraphModule) -> None:
    """Give each block what AOT reads off a graph Dynamo made (its ``meta``, the parameters' sources, each input's
    ``_dynamo_source``): without it AOT takes a block for an exported graph and marks no weight or POP state
    tensor a static input (what CUDA graphs and Inductor's constant handling rely on)."""
    from passes.graph import DYNAMO_GRAPH_ATTRS

    sources = {n.name: getattr(n, "_dynamo_source", None) for n in gm.graph.nodes if n.op == "placeholder"}
    for name, sub in split.named_children():
        if not isinstance(sub, fx.GraphModule):
            continue
        sub.meta = dict(gm.meta)
        for attr in DYNAMO_GRAPH_ATTRS:
            if hasattr(gm, attr):
                setattr(sub, attr, getattr(gm, attr))
        for n in sub.graph.find_nodes(op="placeholder"):
            n._dynamo_source = sources.get(n.name)


def _fake(ex: Any, orig: fx.Node, mode) -> Any:
    """A fake example value for a graph input, as AOT would make it: a real tensor fakified with the symbolic sizes
    Dynamo traced it with (``TracingContext.tensor_to_context``), a size input as Dynamo's SymInt."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(ex, FakeTensor):
        return ex
    if isinstance(ex, torch.Tensor):
        from torch._dynamo.utils import to_fake_tensor

        return to_fake_tensor(ex, mode)
    v = orig.meta.get("example_value")
    return v if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) else ex


def _single_output(sub: fx.GraphModule) -> bool:
    """Make a submodule return a tuple (what AOT compiles); True if it returned one value before."""
    out = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return False
    out.args = ((out.args[0],),)
    sub.recompile()
    return True


def _fake_mode(example_inputs):
    from pop_fx.backend import _fake_mode as fake_mode

    return fake_mode(example_inputs)


__all__ = ["block_of", "compile_blocks", "partition", "signature"]
