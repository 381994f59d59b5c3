"""The activations the pop:: ops apply themselves, by name and by position (graphs carry the index, an int).

The proxy ops (``candidate_proxy``) and the experts ops run an FFN's activation inside one op, so they need
it as a function; every other site keeps the graph's own activation nodes. One table for all of them.
"""

from __future__ import annotations

import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def activation(code_or_name: int | str):
    """The function of ``ACTIVATIONS[code]`` (or of a name in it); ValueError naming the allowed ones."""
    name = ACTIVATIONS[code_or_name] if isinstance(code_or_name, int) else code_or_name
    try:
        return _FNS[name]
    except KeyError:
        raise ValueError(f"activation={code_or_name!r} is not supported: allowed one of {list(ACTIVATIONS)}") from None


__all__ = ["ACTIVATIONS", "activation"]
