"""Property tests of the layer-adaptive budgets (pop_fx/allocation.py): the total is kept, sizes stay in their
buckets, identical sites keep the uniform allocation, ties are deterministic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pop_fx import PopConfig
from pop_fx import config as config_module
from pop_fx.allocation import BUDGETS, RULES, allocate, bucket_keeps, solve, tail_energy
from pop_fx.partition import partition_sizes, sizes_for_keep

d_ffs = st.integers(min_value=2, max_value=400)
rs = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)
gammas = st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.4, 1.0, 2.0])
rules = st.sampled_from([b for b in BUDGETS if b != "uniform"])


def site_scores(draw, n_sites, d_ff):
    # Few distinct values (ties are the interesting case) times a per-site scale (sites differ in units).
    out = []
    for _ in range(n_sites):
        vals = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 7.0, 40.0]), min_size=d_ff, max_size=d_ff))
        out.append(torch.tensor(vals) * draw(st.sampled_from([1e-3, 1.0, 30.0])))
    return out


def test_budget_names_are_the_configs():
    assert set(BUDGETS) == set(config_module._BUDGETS) and BUDGETS[0] == "uniform"
    assert set(RULES) == set(BUDGETS) - {"uniform"}


def test_budget_field_is_checked_naming_it():
    with pytest.raises(ValueError, match=r"budget.*allowed one of \['uniform', 'mass'"):
        PopConfig(budget="owl")
    with pytest.raises(ValueError, match="budget"):
        PopConfig(budget="mass").check_compiled()
    assert PopConfig().budget == "uniform" and PopConfig(budget="uniform").check_compiled()


@given(d_ffs, rs, gammas)
def test_sizes_for_keep_is_partition_sizes_at_the_uniform_keep(d_ff, r, gamma):
    assert sizes_for_keep(d_ff, round((1 - r) * d_ff), gamma) == partition_sizes(d_ff, r, gamma)


def test_sizes_for_keep_rejects_bad_counts():
    for bad in (-1, 11, 2.0, True):
        with pytest.raises(ValueError, match="n_keep"):
            sizes_for_keep(10, bad, 0.1)


@given(d_ffs, rs, gammas)
def test_buckets_share_n_C_and_n_select(d_ff, r, gamma):
    keeps, start = bucket_keeps(d_ff, r, gamma)
    n_u = round((1 - r) * d_ff)
    if start < 0:  # the uniform size itself is out of range (dense or empty): no allocation
        assert not 1 <= n_u <= d_ff - 1
        return
    assert keeps[start] == n_u and keeps == sorted(set(keeps))
    base = sizes_for_keep(d_ff, n_u, gamma)
    for n in keeps:
        sz = sizes_for_keep(d_ff, n, gamma)
        assert 1 <= n <= d_ff - 1 and (sz.n_C, sz.n_select) == (base.n_C, base.n_select)
        assert (n - n_u) % max(1, round(0.05 * d_ff)) == 0 and abs(n - n_u) <= 4 * max(1, round(0.05 * d_ff))


def test_smollm2_buckets():
    keeps, start = bucket_keeps(1536, 0.5, 0.1)
    assert keeps == [768 + 77 * k for k in range(-4, 5)] and start == 4
    sizes = [sizes_for_keep(1536, n, 0.1) for n in keeps]
    assert {(s.n_C, s.n_select) for s in sizes} == {(154, 77)}
    assert [s.n_R for s in sizes] == [n - 77 for n in keeps]


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(8, 60), rs, gammas, rules)
def test_total_is_kept_and_sizes_stay_in_buckets(data, n_sites, d_ff, r, gamma, rule):
    scores = site_scores(data.draw, n_sites, d_ff)
    got = allocate(rule, scores, [d_ff] * n_sites, r, gamma)
    uniform = partition_sizes(d_ff, r, gamma)
    assert sum(s.n_keep for s in got) == n_sites * uniform.n_keep  # exactly the uniform total
    keeps, start = bucket_keeps(d_ff, r, gamma)
    for s in got:
        if start < 0:
            assert s == uniform
        else:
            assert s.n_keep in keeps and s == sizes_for_keep(d_ff, s.n_keep, gamma)
            assert (s.n_C, s.n_select) == (uniform.n_C, uniform.n_select)
        assert s.n_R + s.n_C + s.n_P == d_ff


@settings(max_examples=40, deadline=None)
@given(st.data(), st.lists(st.integers(8, 40), min_size=1, max_size=6), rs, rules)
def test_each_d_ff_group_keeps_its_own_total(data, d_ff_list, r, rule):
    scores = [site_scores(data.draw, 1, f)[0] for f in d_ff_list]
    got = allocate(rule, scores, d_ff_list, r, 0.1)
    for f in set(d_ff_list):
        members = [i for i, g in enumerate(d_ff_list) if g == f]
        assert sum(got[i].n_keep for i in members) == len(members) * partition_sizes(f, r, 0.1).n_keep


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(2, 6), st.integers(8, 60), rs, gammas, rules)
def test_identical_sites_keep_the_uniform_allocation(data, n_sites, d_ff, r, gamma, rule):
    one = site_scores(data.draw, 1, d_ff)[0]
    got = allocate(rule, [one.clone() for _ in range(n_sites)], [d_ff] * n_sites, r, gamma)
    assert got == [partition_sizes(d_ff, r, gamma)] * n_sites


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(2, 6), st.integers(8, 60), rs, rules)
def test_deterministic_and_order_free_up_to_ties(data, n_sites, d_ff, r, rule):
    scores = site_scores(data.draw, n_sites, d_ff)
    a = allocate(rule, scores, [d_ff] * n_sites, r, 0.1)
    assert a == allocate(rule, [s.clone() for s in scores], [d_ff] * n_sites, r, 0.1)


def test_uniform_budget_is_partition_sizes():
    scores = [torch.rand(50), torch.rand(50) * 100]
    assert allocate("uniform", scores, [50, 50], 0.5, 0.1) == [partition_sizes(50, 0.5, 0.1)] * 2


def test_mass_gives_channels_to_the_flat_site():
    flat = torch.ones(100)
    peaked = torch.cat([torch.full((10,), 10.0), torch.full((90,), 0.01)])
    got = allocate("mass", [peaked, flat], [100, 100], 0.5, 0.1)
    assert [s.n_keep for s in got] == [30, 70]  # the peaked site gives all 4 steps of 5 to the flat one


def test_ties_go_to_the_lower_site_index():
    # three sites, two identical takers and one donor with room for one step: the first taker gets it
    losses = [[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
    assert solve(losses, [1, 1, 1]) == [2, 1, 0]


def test_solve_moves_only_for_a_strict_gain():
    assert solve([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]], [1, 1]) == [1, 1]  # equal trade: nobody moves
    assert solve([[2.0, 1.0, 0.0], [5.0, 1.0, 0.9]], [1, 1]) == [1, 1]  # site 1's last step gains 0.1 < 1
    assert solve([[1.0, 1.0, 1.0], [5.0, 4.0, 0.0]], [1, 1]) == [0, 2]


@given(st.data(), st.integers(2, 5), st.integers(1, 4))
def test_solve_is_optimal_on_convex_losses(data, n_sites, steps):
    # convex decreasing losses: brute force over every assignment with the same total
    import itertools

    losses = []
    for _ in range(n_sites):
        dec = sorted(data.draw(st.lists(st.integers(0, 20), min_size=2 * steps, max_size=2 * steps)), reverse=True)
        losses.append([float(sum(dec[i:])) for i in range(2 * steps + 1)])
    k = solve(losses, [steps] * n_sites)
    assert sum(k) == steps * n_sites
    best = min(sum(losses[s][c[s]] for s in range(n_sites))
               for c in itertools.product(range(2 * steps + 1), repeat=n_sites) if sum(c) == steps * n_sites)
    assert math.isclose(sum(losses[s][k[s]] for s in range(n_sites)), best)


def test_tail_energy():
    s = torch.tensor([1.0, 3.0, float("nan"), 2.0])
    assert tail_energy(s, [0, 1, 2, 4]).tolist() == [14.0, 5.0, 1.0, 0.0]


def test_sites_without_mass_give_first_and_never_take():
    # an all-zero (or all-NaN: NaN counts as 0) site loses nothing by giving: the lower index gives first
    got = allocate("mass", [torch.zeros(40), torch.full((40,), float("nan")), torch.rand(40) + 0.1], [40] * 3, 0.5, 0.1)
    assert [s.n_keep for s in got] == [12, 20, 28]
    assert allocate("mass", [torch.zeros(40)] * 3, [40] * 3, 0.5, 0.1) == [partition_sizes(40, 0.5, 0.1)] * 3
