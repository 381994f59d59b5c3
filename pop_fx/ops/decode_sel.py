"""``pop::decode_sel``: the down projection over R ∪ the candidates a proxy chose (``candidate_proxy``).

On CPU the chosen activations are scattered into C's positions of the R ∪ C layout and ONE masked GEMV
streams its contiguous rows; on CUDA ``pop::decode``'s kernel reads only R and the chosen rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pop_fx.ops.layout import kept_rows
from pop_fx.ops.rows_gemv import on_cuda


@torch.library.triton_op("pop::decode_sel", mutates_args=())
def decode_sel(h: Tensor, wd_t: Tensor, bd: Tensor | None, sel: Tensor, n_R: int) -> Tensor:
    """Down projection of h ([..., n_R + n_select]: R then the chosen) through the R ∪ C layout ``wd_t``."""
    h2 = h.reshape(-1, h.shape[-1])
    n_C = wd_t.shape[0] - n_R
    if on_cuda(h):  # decode_down's kernel reads h at R and at the chosen layout rows only
        from pop_fx.ops.decode import decode_down_triton

        h_rc = torch.zeros(h2.shape[0], n_R + n_C, dtype=h2.dtype, device=h2.device).index_copy(
            1, kept_rows(sel, n_R, n_R + n_C, 1), h2)
        y = decode_down_triton(h_rc, wd_t, sel, n_R, launch=torch.library.wrap_triton)
        if bd is not None:
            y = y + bd
        return y.reshape(*h.shape[:-1], wd_t.shape[1])
    # The chosen candidates' activations scattered into C's positions (zeros elsewhere), then ONE GEMV over
    # R ∪ C rows: on a CPU that streams contiguous rows, where a row gather would copy them first.
    h_c = torch.zeros(h2.shape[0], n_C, dtype=h2.dtype, device=h2.device).index_copy(1, sel, h2[:, n_R:])
    y = torch.cat([h2[:, :n_R], h_c], dim=-1) @ wd_t
    if bd is not None:
        y = y + bd
    return y.reshape(*h.shape[:-1], wd_t.shape[1])


__all__ = ["decode_sel"]
