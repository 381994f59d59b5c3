"""``pop::prefill``: the importance it partitions by excludes padding (2-D and 4-D masks) and survives NaN."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx import partition as P
from pop_fx.ops.layout import CONV1D
from pop_fx.ops.prefill import GATHER_MIN_TOKENS, prefill

D, F, OUT = 8, 23, 6
SIZES = P.partition_sizes(F, 0.5, 0.2)


def _state():
    n_rc = SIZES.n_R + SIZES.n_C
    return (torch.zeros(1, n_rc, dtype=torch.long), torch.zeros(1, SIZES.n_C), torch.zeros(2 * n_rc, D),
            torch.zeros(2 * n_rc), torch.zeros(OUT, n_rc))


def _partition(h, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    wd, w_a, w_b = torch.randn(OUT, F, generator=g), torch.randn(F, D, generator=g), torch.randn(F, D, generator=g)
    rc_idx, wd_norm_c, w_in, b_in, wd_rc = _state()
    y = prefill(h, mask, wd, None, w_a, None, w_b, None, P.down_column_norm(wd), rc_idx, wd_norm_c, w_in, b_in, wd_rc,
                SIZES.n_keep, SIZES.n_R, SIZES.n_C, 0, False, True)
    return rc_idx, y


def _masks(pad: int, L: int, S: int):
    """The same left padding of row 0 as a 2-D mask, a 4-D bool mask and a 4-D additive float mask."""
    two = torch.ones(2, S, dtype=torch.long)
    two[0, :pad] = 0
    q = torch.arange(L)[:, None] + (S - L)
    allowed = (torch.arange(S)[None, :] <= q)[None, None] & (two[:, None, None, :] != 0)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"2d": two, "4d-bool": allowed, "4d-additive": additive}


@settings(max_examples=20)
@given(pad=st.integers(1, 4), seed=st.integers(0, 1000), kind=st.sampled_from(["2d", "4d-bool", "4d-additive"]))
def test_padding_rows_never_count_whatever_the_mask_form(pad, seed, kind):
    L = 6
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, L, F, generator=g)
    mask = _masks(pad, L, L)[kind]
    other = h.clone()
    other[0, :pad] = torch.randn(pad, F, generator=g) * 100  # anything under the padding
    a, _ = _partition(h, mask)
    b, _ = _partition(other, mask)
    assert torch.equal(a, b)
    assert not torch.equal(_partition(h, None)[0], _partition(other, None)[0])  # it would count without the mask


def test_a_static_cache_mask_has_more_keys_than_tokens():
    # generate(cache_implementation="static"): [B, 1, L, max_cache_len], the current tokens at columns 0..L-1.
    h = torch.randn(2, 5, F, generator=torch.Generator().manual_seed(3))
    two = _masks(2, 5, 5)["2d"]
    allowed = torch.zeros(2, 1, 5, 9, dtype=torch.bool)
    allowed[..., :5] = _masks(2, 5, 5)["4d-bool"]
    assert torch.equal(_partition(h, allowed)[0], _partition(h, two)[0])


@pytest.mark.parametrize("where", ["padding", "token"])
def test_nan_in_one_row_does_not_poison_the_partition(where):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, F, generator=g)
    mask = _masks(2, 6, 6)["2d"]
    clean = h.clone()
    if where == "padding":  # a fully masked row may hold NaN (SDPA over no keys): NaN·0 is NaN, where() is not
        h[0, 0] = float("nan")
        clean[0, 0] = 0
    else:  # a NaN entry of a real token counts as 0, as in the eager reference
        h[1, 3, 7] = float("nan")
        clean[1, 3, 7] = 0
    got, y = _partition(h, mask)
    assert torch.equal(got, _partition(clean, mask)[0])
    assert not torch.isnan(y[1, :3]).any()


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("tokens", [GATHER_MIN_TOKENS - 1, GATHER_MIN_TOKENS + 5])
def test_pruned_prefill_output_is_the_down_projection_of_the_kept_channels(tokens, conv1d):
    # Below GATHER_MIN_TOKENS the op masks H; from it on it projects the gathered kept channels: both must be
    # down(H · 1[keep]) with the batch's own kept set, for nn.Linear's [out, d_ff] and Conv1D's [d_ff, out] Wd.
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, tokens // 2 + 1, F, generator=g)
    wd, w_a, w_b = (torch.randn(*s, generator=g) for s in ((OUT, F), (F, D), (F, D)))
    bd = torch.randn(OUT, generator=g)
    rc_idx, wd_norm_c, w_in, b_in, wd_rc = _state()
    wd_op, w_a, w_b = ((w.t().contiguous() if conv1d else w) for w in (wd, w_a, w_b))  # Conv1D stores [in, out]
    y = prefill(h, None, wd_op, bd, w_a, None, w_b, None, P.down_column_norm(wd), rc_idx, wd_norm_c, w_in, b_in, wd_rc,
                SIZES.n_keep, SIZES.n_R, SIZES.n_C, CONV1D if conv1d else 0, False, True)
    keep = P.keep_set(P.importance(h, P.down_column_norm(wd)), SIZES)
    mask = torch.zeros(F, dtype=h.dtype).index_fill_(0, keep, 1)
    torch.testing.assert_close(y, torch.nn.functional.linear(h * mask, wd, bd))
