"""Triton for the CUDA kernels: its import, the interpreter switch and the SM count, in one place.

Every kernel file imports ``triton`` / ``tl`` from here (``None`` where Triton is not installed: it is a Linux-only
dependency and the CPU path never needs it). ``INTERPRET`` is read once, at import, as Triton itself reads
``TRITON_INTERPRET`` when a kernel is defined: tests that interpret set it before importing ``pop_fx``.

Under the interpreter a kernel's scalars are numpy arrays of one element; Triton 3.6's interpreter turns them into
range bounds with ``int(array)``, which numpy >= 2.4 refuses for arrays that are not 0-d (``InterpreterError: only
0-dimensional arrays can be converted to Python scalars`` from every ``tl.range`` over a program-dependent bound).
Triton 3.9 reads ``int(array.squeeze())``; ``_fix_interpreter_index`` makes 3.6 do the same (interpreter only:
compiled kernels never see it).
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
H200_SMS = 132  # the interpreter on a CPU plans grids for an H100/H200's count, so they match the GPU's


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100/H200's 132 off CUDA, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H200_SMS


def on_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` can go to a Triton kernel (a CUDA tensor, Triton installed)."""
    return t.device.type == "cuda" and triton is not None


def _fix_interpreter_index() -> bool:
    """Make the interpreter's tensors index with ``int(data.squeeze())`` (see the module docstring); True if patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_pop_fx_index", False):
        return False

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._pop_fx_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


if INTERPRET and triton is not None:
    _fix_interpreter_index()

__all__ = ["INTERPRET", "on_cuda", "sm_count", "tl", "triton"]
