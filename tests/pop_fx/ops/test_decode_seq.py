"""pop::decode_seq (scope="sequence"): per-sequence selection and masked down against the definition."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx import partition as P
from pop_fx.ops.decode_seq import decode_seq, keep_indices
from pop_fx.ops.layout import CONV1D


def _case(B, d_ff, n_R, n_C, N, seed, conv1d):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, 1, d_ff, generator=g)
    wd = torch.randn((d_ff, N) if conv1d else (N, d_ff), generator=g)
    wd_norm = P.down_column_norm(wd, 0 if conv1d else -1)
    cap = B + 2  # state is allocated for more sequences than this batch has
    rc = torch.stack([torch.randperm(d_ff, generator=g)[: n_R + n_C] for _ in range(cap)])
    return h, wd, wd_norm, rc


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), d_ff=st.integers(2, 40), fr=st.floats(0, 1), fc=st.floats(0, 1), fk=st.floats(0, 1),
       N=st.integers(1, 20), seed=st.integers(0, 1000), conv1d=st.booleans(), bias=st.booleans())
def test_each_sequence_uses_its_own_channels(B, d_ff, fr, fc, fk, N, seed, conv1d, bias):
    n_R = round(fr * (d_ff - 1))
    n_C = max(1, round(fc * (d_ff - n_R)))
    k = round(fk * n_C)
    h, wd, wd_norm, rc = _case(B, d_ff, n_R, n_C, N, seed, conv1d)
    bd = torch.randn(N) if bias else None
    y = decode_seq(h, wd, bd, wd_norm, rc, n_R, k, CONV1D if conv1d else 0)
    for b in range(B):
        c = rc[b, n_R:]
        sel = P.select(h[b, 0, c][None], wd_norm[c][None], k, per_sequence=True)[0]
        keep = torch.cat([rc[b, :n_R], c[sel]])
        cols = wd[keep] if conv1d else wd[:, keep].t()
        expect = h[b, 0, keep].double() @ cols.double() + (bd.double() if bias else 0)
        torch.testing.assert_close(y[b, 0].double(), expect, atol=1e-4, rtol=1e-4)


def test_keep_indices_shape_and_membership():
    h, wd, wd_norm, rc = _case(3, 30, 10, 8, 5, 0, False)
    keep = keep_indices(h.reshape(3, 30), wd_norm, rc, 10, 4)
    assert keep.shape == (3, 14)
    for b in range(3):
        assert set(keep[b, :10].tolist()) == set(rc[b, :10].tolist())
        assert set(keep[b, 10:].tolist()) <= set(rc[b, 10:].tolist())
