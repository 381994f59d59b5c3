"""pop::decode (batch scope): the torch path against the definition, over odd shapes and dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx import partition as P
from pop_fx.ops.decode import decode, decode_reference
from pop_fx.partition import candidate_topk

# One unit of rounding of the output at its scale (fp32 accumulation, one rounding to the dtype). A wrong
# candidate row (the best selected one replaced by the worst) must exceed it: test_odd_shapes_each_dtype checks.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def definition(h_rc, wd_rc, bd, wd_norm_c, n_R, k, wrong=False):
    """Wd[:, R ∪ S_t] · H_t[R ∪ S_t], S_t by docs/spec.md's stable ranking, in fp64 (``wrong``: S_t's best candidate
    swapped for the worst one, the negative control)."""
    h2 = h_rc.reshape(-1, h_rc.shape[-1]).double()
    keep = list(range(n_R))
    if k:
        h_c = h_rc.reshape(-1, h_rc.shape[-1])[:, n_R:]
        sel = P.select(h_c, wd_norm_c, k).tolist()
        if wrong:
            order = P.rank(P.candidate_scores(h_c, wd_norm_c)).tolist()
            sel = [c for c in sel if c != order[0]] + [order[-1]]
        keep += [n_R + c for c in sel]
    y = h2[:, keep] @ wd_rc.double()[:, keep].t()
    if bd is not None:
        y = y + bd.double()
    return y.reshape(*h_rc.shape[:-1], -1)


def _case(B, n_R, n_C, N, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, 1, n_R + n_C, generator=g).to(dtype)
    wd_rc = torch.randn(N, n_R + n_C, generator=g).to(dtype)
    bd = torch.randn(N, generator=g).to(dtype) if bias else None
    wd_norm_c = torch.rand(n_C, generator=g) + 0.1
    return h, wd_rc, bd, wd_norm_c


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), n_R=st.integers(0, 40), n_C=st.integers(1, 30), N=st.integers(1, 50),
       frac=st.floats(0, 1), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_reference_equals_definition_fp32(B, n_R, n_C, N, frac, bias, seed):
    k = round(frac * n_C)
    h, wd_rc, bd, wn = _case(B, n_R, n_C, N, k, torch.float32, bias, seed)
    got = decode_reference(h, wd_rc, bd, wn, n_R, k)
    assert got.shape == (B, 1, N)
    torch.testing.assert_close(got.double(), definition(h, wd_rc, bd, wn, n_R, k), atol=1e-4, rtol=1e-4)


def test_odd_shapes_each_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, n_R, n_C, N, k in [(1, 691, 154, 576, 77), (3, 37, 19, 131, 7), (2, 0, 64, 33, 32), (1, 5, 1, 7, 1)]:
            h, wd_rc, bd, wn = _case(B, n_R, n_C, N, k, dtype, True, B * N)
            got = decode(h, wd_rc, bd, wn, n_R, k).double()  # the registered op, as the graph calls it
            ref = definition(h, wd_rc, bd, wn, n_R, k)
            tol = TOL[dtype] * (ref.abs().max().item() + 1)
            assert (got - ref).abs().max().item() <= tol, (dtype, B, n_R, n_C)
            if 0 < k < n_C:  # a worse candidate exists to swap in
                assert (got - definition(h, wd_rc, bd, wn, n_R, k, wrong=True)).abs().max().item() > tol


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 5), n_C=st.integers(1, 40), frac=st.floats(0, 1), seed=st.integers(0, 10_000),
       per_seq=st.booleans())
def test_topk_selects_the_same_set_as_the_definition(B, n_C, frac, seed, per_seq):
    k = round(frac * n_C)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n_C, generator=g)
    wn = torch.rand((B, n_C) if per_seq else (n_C,), generator=g) + 0.1
    fast = candidate_topk(h, wn, k, per_sequence=per_seq).sort(dim=-1).values
    assert torch.equal(fast, P.select(h, wn.reshape(-1) if not per_seq else wn, k, per_sequence=per_seq))


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 4), n_C=st.integers(1, 64), frac=st.floats(0, 1), seed=st.integers(0, 10_000),
       per_seq=st.booleans(), nan=st.booleans())
def test_topk_breaks_ties_by_channel_index_and_ranks_nan_last(B, n_C, frac, seed, per_seq, nan):
    # Ties are what random data never has: ReLU's zeros, repeated activations, equal norms. docs/spec.md ranks by
    # (-score, channel index) with NaN last; every path must pick exactly that set.
    k = round(frac * n_C)
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (B, n_C), generator=g).float()  # many exact ties, zeros among them
    if nan:
        h[torch.rand(B, n_C, generator=g) < 0.2] = float("nan")
    wn = torch.ones((B, n_C) if per_seq else (n_C,))
    fast = candidate_topk(h, wn, k, per_sequence=per_seq).sort(dim=-1).values
    assert torch.equal(fast, P.select(h, wn.reshape(-1) if not per_seq else wn, k, per_sequence=per_seq))
