"""The prefill-time layout: R ∪ C rows of gate/up and columns of down, copied contiguously."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx import partition as P
from pop_fx.ops.layout import CONV1D, FUSED, _bits, gather_columns, gather_rows, padded, write_partition


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


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       experts=st.sampled_from([None, 1, 3]), rows=st.integers(1, 9), cols=st.integers(1, 23),
       pad=st.integers(0, 5), data=st.data())
def test_gather_columns_and_rows_copy_exactly_what_index_select_would(dtype, experts, rows, cols, pad, data):
    """The layout's copies by index (an int view of the bits, a broadcast index, flattened expert rows) move
    exactly the elements ``index_select`` would, NaN and -0.0 included, into strided (padded) destinations."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    lead = () if experts is None else (experts,)
    src = torch.randn(*lead, rows, cols, generator=g).to(dtype)
    src.view(-1)[0], src.view(-1)[-1] = float("nan"), -0.0
    n = data.draw(st.integers(1, cols))
    idx = torch.stack([torch.randperm(cols, generator=g)[:n] for _ in range(experts or 1)])
    idx = idx[0] if experts is None else idx
    out = torch.full((*lead, rows, n + pad), 7.0, dtype=dtype)[..., :n]
    gather_columns(src, idx, out)
    want = src.index_select(-1, idx) if experts is None else \
        torch.stack([src[e].index_select(-1, idx[e]) for e in range(experts)])
    assert torch.equal(_bits(out), _bits(want.contiguous()))
    if experts is not None:  # rows: [E, rows, cols] -> [E, n_rows, cols]
        k = data.draw(st.integers(1, rows))
        ridx = torch.stack([torch.randperm(rows, generator=g)[:k] for _ in range(experts)])
        out_r = torch.empty(experts, k, cols, dtype=dtype)
        gather_rows(src, ridx, out_r)
        want_r = torch.stack([src[e].index_select(0, ridx[e]) for e in range(experts)])
        assert torch.equal(_bits(out_r), _bits(want_r))
