"""Node helpers shared by the passes: what a node of Dynamo's torch-level graph is, read off its target and
``meta`` (example values, the real Parameter behind a placeholder, the module path, pointwise kinds).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx


# ----------------------------------------------------------------------------------------------
# node helpers
# ----------------------------------------------------------------------------------------------

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_ADDMM = {torch.addmm}
_VIEW_METHODS = {"view", "reshape"}


def val(n) -> torch.Tensor | None:
    """The example value Dynamo recorded for a node (``example_value``; ``val`` after other passes)."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_symbolic_scalar(n) -> bool:
    """A node whose value is a Python/symbolic number (a size expression under dynamic shapes), not a tensor."""
    if not isinstance(n, fx.Node):
        return False
    v = n.meta.get("example_value", n.meta.get("val"))
    return isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def param_of(n) -> torch.Tensor | None:
    """The real model Parameter behind a weight placeholder, or None."""
    if not isinstance(n, fx.Node) or n.op != "placeholder":
        return None
    ga = n.meta.get("grapharg")
    try:
        ex = getattr(ga, "example", None)
    except AssertionError:  # Dynamo's weak reference to a temporary input has expired: not a Parameter
        return None
    return ex if isinstance(ex, torch.nn.Parameter) else None


def input_name(n: fx.Node) -> str:
    """A graph input as the user names it ("mlp.scale" for Dynamo's ``l_self_modules_mlp_parameters_scale_``)."""
    ga = n.meta.get("grapharg")
    src = getattr(ga, "source", None) or getattr(n, "_dynamo_source", None)
    name = getattr(src, "name", None) if src is not None else None
    name = name() if callable(name) else name  # a method in some torch releases, a property in others
    if not isinstance(name, str):
        name = n.name
    name = re.sub(r"^L\['(self|args|kwargs)'\](\[(\d+|'[^']*')\])?", "", name)  # the root module
    name = re.sub(r"\._(modules|parameters|buffers)\['([^']*)'\]", r".\2", name)
    name = re.sub(r"\['([^']*)'\]", r".\1", name)
    return name.lstrip(".")


def linear_parts(n: fx.Node):
    """(x, weight, bias) of a ``linear`` call node, else None."""
    if n.op != "call_function" or n.target not in _LINEAR:
        return None
    args = list(n.args) + [None] * (3 - len(n.args))
    x, w, b = args[0], n.kwargs.get("weight", args[1]), n.kwargs.get("bias", args[2])
    return x, w, b


def addmm_parts(n: fx.Node):
    """(x2d, weight[in, out], bias) of an ``addmm(bias, x, W)`` node (GPT-2's Conv1D), else None."""
    if n.op != "call_function" or n.target not in _ADDMM or n.kwargs:
        return None
    if len(n.args) != 3:
        return None
    b, x, w = n.args
    return x, w, b


def is_view(n) -> bool:
    return isinstance(n, fx.Node) and (
        (n.op == "call_method" and n.target in _VIEW_METHODS) or (n.op == "call_function" and n.target is torch.reshape)
    )


def module_path(n: fx.Node) -> str:
    """Best-effort module path of a node ("model.layers.0.mlp.down_proj"), for reports only."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return n.name
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['args'][0].", "L['self']", "L['args'][0]"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


# ----------------------------------------------------------------------------------------------
# elementwise region (the activation, the gate product)
# ----------------------------------------------------------------------------------------------

# Pointwise functions a channel-wise activation region may contain (H[j] depends only on g[j], u[j]).
_NONLINEAR_FUNCS = {
    torch.nn.functional.silu: "silu",
    torch.nn.functional.gelu: "gelu",
    torch.nn.functional.relu: "relu",
    torch.nn.functional.relu6: "relu6",
    torch.nn.functional.leaky_relu: "leaky_relu",
    torch.nn.functional.elu: "elu",
    torch.nn.functional.selu: "selu",
    torch.nn.functional.celu: "celu",
    torch.nn.functional.mish: "mish",
    torch.nn.functional.hardswish: "hardswish",
    torch.nn.functional.softplus: "softplus",
    torch.nn.functional.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.relu: "relu",
    torch.erf: "erf",
    torch.exp: "exp",
    torch.square: "square",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
}
# Some activations reach the graph as their C bindings (e.g. GELU(approximate="tanh") -> torch._C._nn.gelu).
for _name in ("gelu", "silu", "relu6", "elu", "hardswish", "mish", "softplus", "leaky_relu", "hardsigmoid"):
    if hasattr(torch._C._nn, _name):
        _NONLINEAR_FUNCS[getattr(torch._C._nn, _name)] = _name
_LINEAR_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg,
}
_NONLINEAR_METHODS = {"sigmoid", "tanh", "relu", "pow", "exp", "erf", "square", "sqrt", "rsqrt"}
_LINEAR_METHODS = {"mul", "add", "sub", "div", "neg", "__mul__", "__add__", "__rmul__", "__radd__", "to", "float", "type_as"}


def elementwise_kind(n: fx.Node) -> str | None:
    """"nonlinear" / "linear" for a whitelisted pointwise op, else None."""
    if n.op == "call_function":
        if n.target in _NONLINEAR_FUNCS:
            return "nonlinear"
        if n.target in _LINEAR_FUNCS:
            return "linear"
    if n.op == "call_method":
        if n.target in _NONLINEAR_METHODS:
            return "nonlinear"
        if n.target in _LINEAR_METHODS:
            return "linear"
    return None


_ACTIVATION_NAMES = {"silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish",
                     "softplus", "sigmoid", "tanh", "erf"}


def is_activation(n: fx.Node) -> bool:
    """An activation function proper (not a norm's pow/rsqrt): evidence that this is an FFN."""
    if n.op == "call_function":
        return _NONLINEAR_FUNCS.get(n.target) in _ACTIVATION_NAMES
    return n.op == "call_method" and n.target in _ACTIVATION_NAMES


def activation_name(region: list[fx.Node]) -> str:
    """A readable name of the region's activation (for reports)."""
    names = set()
    for n in region:
        if n.op == "call_function" and n.target in _NONLINEAR_FUNCS:
            name = _NONLINEAR_FUNCS[n.target]
            if name == "gelu" and n.kwargs.get("approximate", "none") == "tanh":
                name = "gelu_tanh"
            names.add(name)
        elif n.op == "call_method" and n.target in _NONLINEAR_METHODS:
            names.add(n.target)
    if {"tanh", "pow"} <= names:
        return "gelu_tanh (written out)"
    for known in ("silu", "gelu_tanh", "gelu", "relu", "relu6", "mish", "hardswish", "elu", "selu", "sigmoid"):
        if known in names:
            return known
    return "+".join(sorted(names)) or "none"



def token_input(graph: fx.Graph) -> fx.Node | None:
    """The input_ids [B, L] (or inputs_embeds [B, L, d]) placeholder, if the graph has one."""
    for n in graph.nodes:
        if n.op == "placeholder" and ("input_ids" in n.name or "inputs_embeds" in n.name):
            v = val(n)
            if v is not None and v.dim() >= 2:
                return n
    return None
