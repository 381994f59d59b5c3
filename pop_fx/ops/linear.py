"""``pop::linear``: a decode step's ``linear`` (few rows), whose implementation Inductor measures on this machine.

At batch 1 a linear is a GEMV: it streams its weight once and does two flops per weight element, so its speed is
the memory's. ATen's CPU ``linear`` (MKL/oneDNN GEMM with M = 1) streamed SmolLM2's weights at 11–16 GB/s on a
machine that reads 33 GB/s (``examples/decode_profile.py``, docs/decode_speed.md), and each call costs a dispatch.
The same product written as a reduction — ``(x[:, None, :] · W).sum(-1)`` with an fp32 accumulator — is one
loop nest Inductor's C++ backend vectorizes and parallelizes over the output rows, fused with what is around it
(the norm before it, the activation or the residual add after it). Neither wins everywhere (a wide batch re-reads
the weight from the reduction; a fast BLAS may beat it), so both are choices and the autotuned lowering
(``pop_fx.autotune``) times them, caches flushed, on the shapes of the graph:

    mm      ``F.linear`` (ATen: oneDNN/MKL; cuBLAS on CUDA)     — what Inductor does without pop-fx
    reduce  the reduction, fp32 accumulation, the result rounded to the input's dtype once

The backend inserts the op (``passes.rewrite_linear``) for every ``linear`` whose input has at most ``MAX_ROWS``
rows, all static: a decode step's projections, the LM head under ``logits_to_keep=1``, POP's exact gate/up over
R ∪ C. With ``kernels="torch"`` (or ``"triton"``) it is ``mm`` — Inductor's own lowering, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import autotune

MAX_ROWS = 8
"""rows (batch × tokens) up to which a linear becomes ``pop::linear``: the reduction reads the weight once per row
block Inductor tiles, so beyond a decode batch it only loses"""


def linear_reduce(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` as one reduction over the input features, accumulated in fp32."""
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _mm(x, weight, bias):
    return F.linear(x, weight, bias)


def _default(code: int, a, lowering: bool) -> str:
    return "mm"


CHOICES = autotune.register("pop::linear", [
    autotune.Choice("mm", _mm),
    autotune.Choice("reduce", linear_reduce),
], _default)


@torch.library.custom_op("pop::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None, kernels: int = 0) -> Tensor:
    return autotune.run("pop::linear", dict(x=x, weight=weight, bias=bias, kernels=kernels))


@linear.register_fake
def _(x, weight, bias, kernels=0):
    autotune.install()
    return x.new_empty(*x.shape[:-1], weight.shape[0])


__all__ = ["CHOICES", "MAX_ROWS", "linear", "linear_reduce"]
