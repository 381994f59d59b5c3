"""``pop::gather_in``: exact gate/up over R ∪ the candidates a proxy chose (``candidate_proxy``).

R's rows of the layout are one contiguous GEMV; the chosen candidates' rows are gathered — on CPU as a
reduction Inductor fuses the gather into (no gathered copy), on CUDA with ``rows_gemv``'s kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops.layout import kept_rows
from pop_fx.ops.rows_gemv import on_cuda, rows_gemv_triton


@torch.library.triton_op("pop::gather_in", mutates_args=())
def gather_in(x: Tensor, w_in: Tensor, b_in: Tensor | None, sel: Tensor, n_R: int, n_rc: int, n_in: int) -> Tensor:
    """Exact gate/up over R ∪ chosen: [..., n_in·n_keep], each input's R then chosen (the activation's layout)."""
    x2 = x.reshape(-1, x.shape[-1])
    if on_cuda(x):
        rows = kept_rows(sel, n_R, n_rc, n_in)
        z = rows_gemv_triton(x2, w_in, rows, launch=torch.library.wrap_triton)
        if b_in is not None:
            z = z + b_in[rows]
        return z.reshape(*x.shape[:-1], z.shape[-1])
    parts = []
    for i in range(n_in):
        base = i * n_rc
        parts.append(x2 @ w_in[base: base + n_R].t())  # R: contiguous rows, one GEMV
        rows = base + n_R + sel
        z = (w_in[rows][None] * x2[:, None, :]).sum(-1)  # chosen: gathered rows, fused into the reduction
        parts.append(z.to(x2.dtype))
    z = torch.cat(parts, dim=-1)
    if b_in is not None:
        z = z + b_in[kept_rows(sel, n_R, n_rc, n_in)]
    return z.reshape(*x.shape[:-1], z.shape[-1])


__all__ = ["gather_in"]
