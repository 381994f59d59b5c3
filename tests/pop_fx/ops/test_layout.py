"""The prefill-time layout: R ∪ C rows of gate/up and columns of down, copied contiguously."""

import pytest
import torch

from pop_fx import partition as P
from pop_fx.ops.layout import CONV1D, FUSED, padded, write_partition


@pytest.mark.parametrize("flags", [0, FUSED, CONV1D])
def test_layout_equals_gathers(flags):
    g = torch.Generator().manual_seed(flags)
    d, f, out = 12, 37, 9
    sizes = P.partition_sizes(f, 0.5, 0.2)
    n_rc = sizes.n_R + sizes.n_C
    gated = flags != CONV1D
    if flags & CONV1D:
        w_a, wd = torch.randn(d, f, generator=g), torch.randn(f, out, generator=g)
    elif flags & FUSED:
        w_a, wd = torch.randn(2 * f, d, generator=g), torch.randn(out, f, generator=g)
    else:
        w_a, wd = torch.randn(f, d, generator=g), torch.randn(out, f, generator=g)
    w_b = torch.randn(f, d, generator=g) if (gated and not flags & FUSED) else None
    b_a = torch.randn(w_a.shape[1] if flags & CONV1D else w_a.shape[0], generator=g)
    wd_norm = P.down_column_norm(wd, 0 if flags & CONV1D else -1)
    n_in = 2 if gated else 1
    rc_idx, wd_norm_c = torch.zeros(1, n_rc, dtype=torch.long), torch.zeros(1, sizes.n_C)
    w_in, b_in, wd_rc = torch.zeros(n_in * n_rc, d), torch.zeros(n_in * n_rc), torch.zeros(out, padded(n_rc))
    scores = torch.rand(f, generator=g)
    write_partition(scores, sizes, wd, w_a, b_a, w_b, None, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_rc, flags)
    part = P.split(scores, sizes)
    rc = torch.cat([part.R, part.C])
    assert torch.equal(rc_idx[0], rc)
    assert torch.equal(wd_norm_c[0], wd_norm[part.C])
    rows_a = w_a.t() if flags & CONV1D else w_a
    if flags & FUSED:
        assert torch.equal(w_in, torch.cat([rows_a[rc], rows_a[f + rc]]))
        assert torch.equal(b_in, torch.cat([b_a[rc], b_a[f + rc]]))
    elif w_b is not None:
        assert torch.equal(w_in, torch.cat([rows_a[rc], w_b[rc]]))
        assert torch.equal(b_in, torch.cat([b_a[rc], torch.zeros(n_rc)]))
    else:
        assert torch.equal(w_in, rows_a[rc]) and torch.equal(b_in, b_a[rc])
    # [d_out, n_rc] in nn.Linear's layout, each row padded with zeros to a 16-element stride
    assert torch.equal(wd_rc[:, :n_rc], wd[rc].t() if flags & CONV1D else wd[:, rc])
    assert wd_rc.stride(0) % 16 == 0 and not wd_rc[:, n_rc:].any()
