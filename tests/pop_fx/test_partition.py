"""Property tests of the partition core against docs/spec.md, recomputed independently here."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pop_fx.partition import (
    down_column_norm,
    importance,
    keep_set,
    partition_sizes,
    select,
    split,
    top_k,
    weight_only_scores,
)

d_ffs = st.integers(min_value=1, max_value=300)
rs = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)
gammas = st.floats(min_value=0.0, max_value=2.0, allow_nan=False)


# (d_ff, r, γ) -> (n_keep, n_R, n_C, n_P), worked out by hand from docs/spec.md ("Python's built-in round() on
# the float64 expressions exactly as written"; the rank form rules where r + δ > 1):
HAND = [
    ((1536, 0.5, 0.1), (768, 691, 154, 691)),    # SmolLM2: δ·d_ff = 76.8 -> 77, γ·d_ff = 153.6 -> 154
    ((5632, 0.5, 0.1), (2816, 2534, 563, 2535)),  # 1B shape: 281.6 -> 282, 563.2 -> 563
    ((5632, 0.5, 0.0), (2816, 2816, 0, 2816)),    # γ = 0: the static mask, no candidates
    ((5632, 0.5, 2.0), (2816, 0, 5632, 0)),       # γ = 2: every channel a candidate (full re-evaluation)
    ((100, 0.0, 0.1), (100, 95, 5, 0)),           # r = 0: n_C = min(10, 100 - 95)
    ((5, 0.5, 0.2), (2, 2, 1, 2)),                # round(2.5) = 2 and round(0.5) = 0: banker's rounding
    ((10, 0.95, 0.2), (1, 0, 2, 8)),              # (1 - 0.95)·10 = 0.5000000000000004 -> 1; r + δ > 1
    ((11008, 0.299, 0.1), (7717, 7167, 1101, 2740)),  # Llama2-7B at 29.9 %: 7716.608 -> 7717, 550.4, 1100.8
]


@pytest.mark.parametrize("args,want", HAND)
def test_sizes_worked_by_hand_from_the_spec(args, want):
    assert tuple(partition_sizes(*args)) == want


def scores_strategy(d_ff):
    # Few distinct values, so ties (the interesting case) are common.
    return st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 7.0]), min_size=d_ff, max_size=d_ff)


@given(d_ffs, rs, gammas)
def test_sizes_match_spec(d_ff, r, gamma):
    sizes = partition_sizes(d_ff, r, gamma)
    assert sizes.n_keep == round((1 - r) * d_ff) and sizes.n_R <= sizes.n_keep
    assert sizes.n_R + sizes.n_C + sizes.n_P == d_ff
    # each decode step can always select its n_keep - n_R candidates
    assert 0 <= sizes.n_select <= sizes.n_C or sizes.n_keep == 0


@given(st.data(), d_ffs, rs, gammas)
def test_split_disjoint_covering_and_ordered(data, d_ff, r, gamma):
    scores = torch.tensor(data.draw(scores_strategy(d_ff)))
    sizes = partition_sizes(d_ff, r, gamma)
    R, C, P = split(scores, sizes)
    assert (len(R), len(C), len(P)) == (sizes.n_R, sizes.n_C, sizes.n_P)
    allidx = torch.cat([R, C, P]).sort().values
    assert torch.equal(allidx, torch.arange(d_ff))  # disjoint and covering
    for a, b in ((R, C), (C, P), (R, P)):
        if len(a) and len(b):
            assert scores[a].min() >= scores[b].max()
    for part in (R, C, P):
        assert torch.equal(part, part.sort().values)


def test_all_zero_scores_lowest_indices_win():
    sizes = partition_sizes(10, 0.5, 0.2)  # n_keep 5, n_R 4, n_C 2
    R, C, P = split(torch.zeros(10), sizes)
    assert R.tolist() == [0, 1, 2, 3] and C.tolist() == [4, 5] and P.tolist() == [6, 7, 8, 9]
    assert keep_set(torch.zeros(10), sizes).tolist() == [0, 1, 2, 3, 4]


@given(st.data(), st.integers(2, 120), rs, gammas, st.integers(1, 4))
def test_decode_selects_exactly_n_select_from_C(data, d_ff, r, gamma, batch):
    sizes = partition_sizes(d_ff, r, gamma)
    assume(sizes.n_keep >= 1 and not sizes.is_dense)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    scores = torch.rand(d_ff, generator=g)
    wd = torch.rand(d_ff, generator=g) + 0.1
    R, C, _ = split(scores, sizes)
    h = torch.randn(batch, 1, d_ff, generator=g)
    pos = select(h[..., C], wd[C], sizes.n_select)
    chosen = C[pos]
    assert len(chosen) == sizes.n_select == len(set(chosen.tolist()))
    assert set(chosen.tolist()) <= set(C.tolist())
    keep = set(R.tolist()) | set(chosen.tolist())
    assert len(keep) == sizes.n_keep
    # the chosen candidates are the best by |H_t| (L2 over the batch) · ||Wd||
    cand = torch.linalg.vector_norm(h[:, 0, C], dim=0) * wd[C]
    if 0 < sizes.n_select < sizes.n_C:
        assert cand[pos].min() >= cand[[i for i in range(len(C)) if i not in set(pos.tolist())]].max()


@given(st.data(), st.integers(2, 120), rs)
def test_gamma_zero_is_static_top_n_keep(data, d_ff, r):
    sizes = partition_sizes(d_ff, r, 0.0)
    scores = torch.tensor(data.draw(scores_strategy(d_ff)))
    R, C, _ = split(scores, sizes)
    assert len(C) == 0 and sizes.n_select == 0
    assert torch.equal(R, top_k(scores, sizes.n_keep))
    assert torch.equal(R, keep_set(scores, sizes))


@given(st.data(), st.integers(2, 120), rs, st.integers(1, 3))
def test_full_reevaluation_is_per_step_top_n_keep(data, d_ff, r, batch):
    sizes = partition_sizes(d_ff, r, 2.0)
    assert sizes.n_R == 0 and sizes.n_C == d_ff
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    R, C, _ = split(torch.rand(d_ff, generator=g), sizes)
    wd = torch.rand(d_ff, generator=g)
    h = torch.randn(batch, 1, d_ff, generator=g)
    step = C[select(h[..., C], wd[C], sizes.n_select)]
    direct = top_k(torch.linalg.vector_norm(h[:, 0], dim=0) * wd, sizes.n_keep)
    assert torch.equal(step.sort().values, direct)


@given(st.data(), st.integers(2, 80), rs, gammas, st.integers(1, 4))
def test_per_sequence_rows_equal_single_sequence_runs(data, d_ff, r, gamma, batch):
    sizes = partition_sizes(d_ff, r, gamma)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    h = torch.randn(batch, 5, d_ff, generator=g)
    wd = torch.rand(d_ff, generator=g)
    mask = torch.rand(batch, 5, generator=g) > 0.3
    per_seq = importance(h, wd, mask, per_sequence=True)
    R, C, P = split(per_seq, sizes)
    hc = torch.randn(batch, 1, d_ff, generator=g)
    pos = select(torch.gather(hc[:, 0], 1, C), wd[C], sizes.n_select, per_sequence=True)
    for b in range(batch):
        alone = importance(h[b : b + 1], wd, mask[b : b + 1])
        assert torch.allclose(per_seq[b], alone)
        Rb, Cb, Pb = split(alone, sizes)
        assert torch.equal(R[b], Rb) and torch.equal(C[b], Cb) and torch.equal(P[b], Pb)
        assert torch.equal(pos[b], select(hc[b : b + 1, :, Cb], wd[Cb], sizes.n_select))


def test_importance_excludes_padding_and_uses_eq3():
    h = torch.tensor([[[1.0, 2.0], [100.0, 100.0]]])
    wd = torch.tensor([2.0, 1.0])
    got = importance(h, wd, torch.tensor([[1, 0]]))
    assert torch.allclose(got, torch.tensor([2.0, 2.0]))


def test_down_column_norm_layouts():
    w = torch.randn(6, 4)  # Linear: [out, d_ff]
    assert torch.allclose(down_column_norm(w), w.norm(dim=0))
    assert torch.allclose(down_column_norm(w.t(), channel_dim=0), w.norm(dim=0))  # Conv1D: [d_ff, out]
    e = torch.randn(3, 6, 4)
    assert torch.allclose(down_column_norm(e), e.norm(dim=1))


def test_weight_only_scores():
    wd = torch.tensor([1.0, 2.0])
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert torch.allclose(weight_only_scores(wd, [g, g]), torch.tensor([25.0, 2.0]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_d_ff(bad):
    with pytest.raises(ValueError, match="d_ff"):
        partition_sizes(bad, 0.5, 0.1)
