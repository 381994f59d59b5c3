"""Find routed-experts blocks (3-D expert weights) in Dynamo's torch-level FX graph.

transformers 5 stores a layer's experts as two 3-D Parameters, ``gate_up_proj [E, 2I, H]``
and ``down_proj [E, H, I]``, inside one experts module that is called as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. How the
module computes that depends on its *experts implementation*: ``grouped_mm`` (sort by
expert, ``histc``/``cumsum`` offsets, ``transformers::grouped_mm_fallback`` or
``torch._grouped_mm``, scatter back) or ``batched_mm`` (``gate_up_proj[expert_ids]``
gathers, ``bmm``). ``eager`` loops over ``nonzero()`` and breaks the graph.

Design: the matcher does not pattern-match either implementation's internals. It takes
the experts module as one *region* — every node Dynamo attributes to the module (its
``nn_module_stack`` entry) — and checks that the region's interface is exactly the
experts contract: reads the two 3-D Parameters and three routing tensors (hidden,
top-k indices, top-k weights), produces one [T, H] tensor, contains only the ops of the
known implementations (so a bias, a post-expert norm or a clamped gate leaves the block
dense with the op named) and one known activation applied to the first chunk of
gate_up. The rewrite then replaces the *whole* region with one ``pop::`` op that owns
routing-aware POP (per-expert importance, partition and selection). That is simpler and
more robust than re-deriving per-expert token sets from sort/cumsum/bmm nodes, and it
works the same under ``grouped_mm`` and ``batched_mm``. The router is outside the region
and is never touched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from pop_fx.activations import ACTIVATIONS

from passes.match_ffn import Skipped
from passes.nodes import activation_name, is_activation, is_symbolic_scalar, param_of, token_input, val


# Ops the known experts implementations (grouped_mm, batched_mm) put inside the experts module.
# Anything else (a bias add, a post-expert norm, a clamp) leaves the block dense, never approximated.
_ALLOWED_FUNCS = {
    operator.getitem, operator.setitem, operator.mul, operator.floordiv, operator.truediv, operator.add,
    torch.sort, torch.argsort, torch.histc, torch.cumsum, torch.bmm, torch.matmul, torch.empty_like, torch.arange,
    torch.zeros_like, torch.zeros, torch.cat, torch.stack, torch.repeat_interleave, torch.chunk, torch.mul,
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu, torch._C._nn.gelu, torch._C._nn.silu,
    torch.sym_max, torch.sym_min, torch.sym_int, torch.sym_float,
}
for _name in ("_grouped_mm",):
    if hasattr(torch, _name):
        _ALLOWED_FUNCS.add(getattr(torch, _name))
_ALLOWED_METHODS = {
    "view", "reshape", "float", "to", "transpose", "chunk", "unsqueeze", "squeeze", "sum", "repeat_interleave",
    "contiguous", "size", "index_add_", "index_add", "type_as", "flatten", "t", "permute", "expand",
    "clamp", "mul", "mul_", "__mul__", "scatter_add_", "new_zeros", "zero_", "add_", "add",
}
# clamp is allowed only on integer routing tensors (expert parallel's sentinel clamp), checked below.
_ALLOWED_OP_NAMESPACES = {"transformers"}  # transformers::grouped_mm_fallback


@dataclass
class ExpertsMatch:
    """One experts module's region in a graph, replaced as a whole by a ``pop::`` op."""

    path: str
    """module path of the experts module ("model.layers.0.mlp.experts")"""
    region: list[fx.Node]
    """every node of the module, in graph order"""
    output: fx.Node
    """the region's one result used outside it: [T, H]"""
    hidden: fx.Node
    top_k_index: fx.Node
    top_k_weights: fx.Node
    gate_up: fx.Node
    """placeholder of gate_up_proj [E, 2I, H]"""
    down: fx.Node
    """placeholder of down_proj [E, H, I]"""
    param: torch.Tensor
    """the real down_proj Parameter: the state's key"""
    gate_up_param: torch.Tensor
    num_experts: int
    d_ff: int
    d_model: int
    top_k: int
    activation: str
    implementation: str
    tokens: object
    """new tokens per sequence (an int 1 in decode graphs)"""
    batch_source: fx.Node | None
    cached: bool = True
    """the graph reads a KV cache (``passes.classify_graph``); False in the first forward of a one-token prompt"""

    kind = "expert"

    @property
    def is_decode(self) -> bool:
        return isinstance(self.tokens, int) and self.tokens == 1 and self.cached


def _module_key(n: fx.Node) -> tuple[str, str, type] | None:
    """(stack key, path, class) of the innermost module of a node."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key = list(stack)[-1]
    path, cls = stack[key]
    return key, path, cls


def _clean(path: str) -> str:
    for prefix in ("L['self'].", "L['args'][0].", "L['self']", "L['args'][0]"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _in_module(n: fx.Node, key: str) -> bool:
    return key in (n.meta.get("nn_module_stack") or {})


def _op_namespace(t) -> str | None:
    """The ``torch.ops`` namespace of an op (overload or packet), else None."""
    if isinstance(t, torch._ops.OpOverload):
        return t.namespace
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[0]
    return None


def _op_allowed(n: fx.Node) -> str | None:
    """None if the op may appear in an experts region, else its readable name."""
    if n.op == "call_function":
        t = n.target
        if t in _ALLOWED_FUNCS:
            return None
        if _op_namespace(t) in _ALLOWED_OP_NAMESPACES:
            return None
        return getattr(t, "__name__", str(t))
    if n.op == "call_method":
        if n.target == "clamp":
            v = val(n)
            return None if v is not None and not v.is_floating_point() else "clamp (on activations)"
        return None if n.target in _ALLOWED_METHODS else n.target
    if n.op == "call_module":
        return f"module {n.target}"
    return None


def _implementation(region: list[fx.Node]) -> str:
    for n in region:
        if n.op == "call_function" and _op_namespace(n.target) is not None and "grouped_mm" in str(n.target):
            return "grouped_mm"
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_grouped_mm":
            return "grouped_mm"
    if any(n.op == "call_function" and n.target is torch.bmm for n in region):
        return "batched_mm"
    return "unknown"


def _experts_modules(graph: fx.Graph) -> dict[str, tuple[str, list[fx.Node]]]:
    """stack key -> (path, 3-D Parameter placeholders read inside that module)."""
    found: dict[str, tuple[str, list[fx.Node]]] = {}
    for ph in graph.nodes:
        if ph.op != "placeholder" or val(ph) is None or val(ph).dim() != 3:
            continue
        try:
            p = param_of(ph)
        except AssertionError:  # Dynamo's weak reference to a temporary input has expired: not a Parameter
            continue
        if p is None:
            continue
        for u in ph.users:
            mk = _module_key(u)
            if mk is None:
                continue
            key, path, _ = mk
            entry = found.setdefault(key, (_clean(path), []))
            if ph not in entry[1]:
                entry[1].append(ph)
    return found


def match_experts(gm: fx.GraphModule) -> tuple[list[ExpertsMatch], list[Skipped]]:
    """Every routed-experts block of the graph, and the ones left dense with the reason."""
    graph = gm.graph
    matches: list[ExpertsMatch] = []
    skipped: list[Skipped] = []
    for key, (path, params) in _experts_modules(graph).items():
        r = _match_region(graph, key, path, params)
        (matches if isinstance(r, ExpertsMatch) else skipped).append(r)
    return matches, skipped


def _match_region(graph: fx.Graph, key: str, path: str, params: list[fx.Node]) -> ExpertsMatch | Skipped:
    by_shape = {tuple(param_of(p).shape): p for p in params}
    down_node = gate_up_node = None
    for p in params:
        w = param_of(p)
        E, a, b = w.shape
        for q in params:
            if q is p:
                continue
            v = param_of(q)
            if tuple(v.shape) == (E, 2 * b, a):  # p = down [E, H, I], q = gate_up [E, 2I, H]
                down_node, gate_up_node = p, q
    if down_node is None:
        shapes = sorted(by_shape)
        return Skipped(path, f"3-D expert weights of shapes {shapes} are not gate_up_proj [E, 2I, H] + down_proj "
                             "[E, H, I] (transposed, interleaved or ungated layouts are not supported)", params[0])
    down_p, gu_p = param_of(down_node), param_of(gate_up_node)
    E, H, I = down_p.shape
    if len(params) != 2:
        return Skipped(path, f"the experts module reads {len(params)} 3-D Parameters (a bias?): only gate_up_proj "
                             "and down_proj are supported", down_node)
    region = [n for n in graph.nodes if n.op != "placeholder" and _in_module(n, key)]
    inside = set(region)
    for n in region:
        bad = _op_allowed(n)
        if bad is not None:
            return Skipped(path, f"op {bad} inside the experts module is not one of the grouped_mm / batched_mm "
                                 "implementations' ops (bias, post-expert norm or custom gate): left dense", down_node)
    # Inputs: tensors defined outside the region that the region reads.
    ins: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in ins:
                ins.append(a)
    tensors = [a for a in ins if isinstance(val(a), torch.Tensor) and a not in (down_node, gate_up_node)]
    extra_params = [a for a in tensors if param_of(a) is not None]
    if extra_params:
        return Skipped(path, f"the experts module reads another Parameter ({extra_params[0].name}): biases and "
                             "post-expert norms are not supported", down_node)
    hidden = [a for a in tensors if val(a).dim() == 2 and val(a).shape[-1] == H and val(a).is_floating_point()]
    index = [a for a in tensors if val(a).dim() == 2 and not val(a).is_floating_point()]
    weights = [a for a in tensors if val(a).dim() == 2 and val(a).is_floating_point() and a not in hidden]
    if len(hidden) != 1 or len(index) != 1 or len(weights) != 1 or len(tensors) != 3:
        return Skipped(path, "the experts module's inputs are not (hidden [T, H], top_k_index [T, k], top_k_weights "
                             f"[T, k]): got {[(a.name, tuple(val(a).shape)) for a in tensors]}", down_node)
    # Results used outside the region. With dynamic shapes Dynamo computes a size expression (e.g. T·k) once
    # and reuses it in the next layer's region: such symbolic scalars are shared, not results; they stay.
    outs = [n for n in region if any(u not in inside for u in n.users) and not is_symbolic_scalar(n)]
    if len(outs) != 1 or val(outs[0]) is None or tuple(val(outs[0]).shape) != tuple(val(hidden[0]).shape):
        return Skipped(path, f"the experts module has {len(outs)} results used outside it, expected one [T, H]", down_node)
    acts = [n for n in region if is_activation(n)]
    act = activation_name(acts)
    if len(acts) != 1 or act not in ACTIVATIONS:
        return Skipped(path, f"experts activation {act!r} ({len(acts)} activation nodes): supported {ACTIVATIONS}",
                       down_node)
    a_in = acts[0].args[0] if acts[0].args else None
    chunk = a_in.args[0] if isinstance(a_in, fx.Node) and a_in.target is operator.getitem else None
    if not (isinstance(chunk, fx.Node) and chunk.target in ("chunk", torch.chunk) and a_in.args[1] == 0):
        return Skipped(path, "the activation does not read the first half of a chunk(2) of gate_up (an interleaved "
                             "or custom gate): not supported", down_node)
    batch_source = token_input(graph)
    if batch_source is None:
        return Skipped(path, "the graph has no input_ids/inputs_embeds to tell batch from tokens", down_node)
    tokens = val(batch_source).shape[1]
    return ExpertsMatch(path, region, outs[0], hidden[0], index[0], weights[0], gate_up_node, down_node, down_p, gu_p,
                        E, I, H, val(index[0]).shape[-1], act, _implementation(region), tokens, batch_source)


__all__ = ["ACTIVATIONS", "ExpertsMatch", "match_experts"]
