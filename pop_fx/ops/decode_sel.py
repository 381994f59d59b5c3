"""``pop::decode_sel``: the down projection over R ∪ the candidates a proxy chose (``candidate_proxy``).

The chosen candidates' activations are scattered into C's positions of the R ∪ C layout (zeros elsewhere)
and ONE GEMV over ``wd_rc`` ([d_out, n_R + n_C], ``nn.Linear``'s layout) projects them: contiguous reads on
every device, where a gather of the chosen columns would copy them first (CPU) or touch the same sectors
(GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.triton_op("pop::decode_sel", mutates_args=())
def decode_sel(h: Tensor, wd_rc: Tensor, bd: Tensor | None, sel: Tensor, n_R: int, n_C: int) -> Tensor:
    """Down projection of h ([..., n_R + n_select]: R then the chosen) through the R ∪ C layout ``wd_rc``."""
    h2 = h.reshape(-1, h.shape[-1])
    wd_rc = wd_rc[:, : n_R + n_C]  # the layout's rows are padded (layout.ROW_ALIGN)
    h_c = torch.zeros(h2.shape[0], n_C, dtype=h2.dtype, device=h2.device).index_copy(1, sel, h2[:, n_R:])
    y = F.linear(torch.cat([h2[:, :n_R], h_c], dim=-1), wd_rc, bd)
    return y.reshape(*h.shape[:-1], wd_rc.shape[0])


__all__ = ["decode_sel"]
