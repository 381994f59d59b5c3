"""The cost model: simplified sympy expressions, and their numbers against partition_sizes on real shapes."""

import pytest
import sympy
from hypothesis import assume, given
from hypothesis import strategies as st

from pop_fx.tools import costmodel
from pop_fx.tools.costmodel import b, d, f, gamma, r
from pop_fx.partition import partition_sizes

SHAPES = {"SmolLM2": (576, 1536), "Llama2-7B": (4096, 11008), "Llama3.1-8B": (4096, 14336)}


def test_gated_overhead_simplifies_to_gamma_over_3():
    ex = costmodel.expressions("gated")
    assert ex["overhead"] == gamma / 3  # structurally, after sympy.simplify: no d, f, b or r left
    assert ex["dense_flops"] == 6 * b * d * f
    assert sympy.simplify(ex["pop_flops"] - 2 * b * d * f * (3 - 3 * r + gamma)) == 0
    assert sympy.simplify(ex["flops_ratio"] - (1 - r + gamma / 3)) == 0
    assert ex["flops_ratio"] == ex["bytes_ratio"]  # one token per sequence: FLOPs and bytes scale alike


def test_plain_overhead_is_gamma_over_4():
    ex = costmodel.expressions("plain")
    assert ex["overhead"] == gamma / 4
    assert ex["dense_flops"] == 4 * b * d * f
    assert costmodel.expressions("fused_gated")["overhead"] == gamma / 3


def test_main_domain_sizes():
    z = costmodel.sizes()
    assert sympy.simplify(z["n_RC"] - (1 - r + gamma / 2) * f) == 0
    assert sympy.simplify(z["n_RC"] - z["n_keep"] - gamma / 2 * f) == 0  # the unselected candidates C ∖ S


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_readable_piecewise_equals_the_derived_one(kind):
    readable, derived = costmodel.overhead_general(kind), costmodel.overhead_derived(kind)
    for rv in [0, 0.01, 0.04, 0.05, 0.3, 0.5, 0.9, 0.95, 0.99]:
        for gv in [0, 0.1, 0.5, 1, 1.5, 2]:
            pt = {r: sympy.nsimplify(rv), gamma: sympy.nsimplify(gv)}
            assert readable.subs(pt) == derived.subs(pt), (kind, rv, gv)
    # Full re-evaluation (γ = 2): every channel computed, the waste is the pruned share of gate/up.
    assert sympy.simplify(costmodel.overhead_general("gated").subs(gamma, 2) - 2 * r / 3) == 0


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("rv,gv", [(0.5, 0.1), (0.299, 0.1), (0.03, 0.1), (0.97, 0.1), (0.6, 1.5), (0.2, 2.0), (0.4, 0.0)])
def test_general_sizes_match_partition_sizes(name, rv, gv):
    _, d_ff = SHAPES[name]
    sz = partition_sizes(d_ff, rv, gv)
    pt = {f: d_ff, r: sympy.nsimplify(rv), gamma: sympy.nsimplify(gv)}
    z = costmodel.sizes_general()
    for key, exact in (("n_keep", sz.n_keep), ("n_R", sz.n_R), ("n_C", sz.n_C), ("n_P", sz.n_P),
                       ("n_RC", sz.n_R + sz.n_C)):
        assert abs(float(z[key].subs(pt)) - exact) <= 1, (key, float(z[key].subs(pt)), exact)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_site_cost_uses_the_rounded_sizes(name):
    d_model, d_ff = SHAPES[name]
    sz = partition_sizes(d_ff, 0.5, 0.1)
    c = costmodel.site_cost("gated", d_model, d_ff, 0.5, 0.1, batch=3)
    n_rc = sz.n_R + sz.n_C
    assert c.n_keep == sz.n_keep and c.n_RC == n_rc
    assert c.dense_flops == 2 * 3 * d_model * 3 * d_ff
    assert c.pop_flops == 2 * 3 * d_model * (2 * n_rc + sz.n_keep)
    assert c.pop_bytes == {"fp32": 4 * d_model * (2 * n_rc + sz.n_keep), "bf16": 2 * d_model * (2 * n_rc + sz.n_keep)}
    assert c.dense_bytes["bf16"] * 2 == c.dense_bytes["fp32"] == 4 * 3 * d_model * d_ff
    # The unrounded expression and the rounded sizes differ by at most a channel per matrix.
    sym = costmodel.evaluate(costmodel.expressions("gated")["pop_flops"], d_model=d_model, d_ff=d_ff,
                             sparsity=0.5, candidate_ratio=0.1, batch=3)
    assert abs(sym - c.pop_flops) <= 3 * 2 * 3 * d_model
    assert abs(c.overhead - 0.1 / 3) <= 2 / (3 * d_ff)


@given(d_ff=st.integers(16, 20000), rv=st.floats(0.0, 0.99), gv=st.floats(0.0, 2.0))
def test_overhead_is_gamma_over_3_up_to_rounding(d_ff, rv, gv):
    sz = partition_sizes(d_ff, rv, gv)
    assume(sz.n_R > 0 and sz.n_C == round(gv * d_ff))  # the main domain: the band is not clipped
    c = costmodel.site_cost("gated", 64, d_ff, rv, gv)
    assert abs(c.overhead - gv / 3) <= 2 / (3 * d_ff) + 1e-12


def test_paper_comparison_rows():
    rows = {p["model"]: p for p in costmodel.paper_comparison()}
    assert set(rows) == {"Llama2-7B", "Llama3.1-8B"}
    assert rows["Llama2-7B"]["sparsity"] == pytest.approx(0.299, abs=1e-3)  # Table 8 of the paper: 29.9% FFN
    for p in rows.values():
        assert p["symbolic"] == pytest.approx(0.1 / 3)
        assert p["ours_dense_ffn"] == pytest.approx(0.1 / 3, abs=2 / (3 * p["d_ff"]))
        sz = partition_sizes(p["d_ff"], p["sparsity"], 0.1)
        assert p["vs_static_ffn"] == pytest.approx(2 * (sz.n_R + sz.n_C - sz.n_keep) / (3 * sz.n_keep))
    assert (rows["Llama2-7B"]["paper"], rows["Llama3.1-8B"]["paper"]) == (0.0285, 0.0348)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind='moe'"):
        costmodel.input_matrices("moe")


def test_proxy_bytes_expression():
    import sympy

    from pop_fx.tools import costmodel as cm

    s = sympy.Symbol("s", positive=True)
    assert sympy.simplify(cm.proxy_expressions("gated", "int8")["bytes_ratio"] - (1 - cm.r + 2 * cm.gamma / (3 * s))) == 0
    assert sympy.simplify(cm.proxy_expressions("gated", "int8-gate")["bytes_ratio"] - (1 - cm.r + cm.gamma / (3 * s))) == 0
    assert sympy.simplify(cm.proxy_expressions("gated", "int3")["bytes_ratio"] - (1 - cm.r + cm.gamma / (4 * s))) == 0
    # fp32, r = 0.5: the int8 proxy over a band γ = 1 reads 2/3 of dense; POP γ = 0.2 reads 17/30.
    half = {s: 4, cm.r: sympy.Rational(1, 2)}
    assert cm.proxy_expressions()["bytes_ratio"].subs({**half, cm.gamma: 1}) == sympy.Rational(2, 3)
    assert cm.expressions()["bytes_ratio"].subs({**half, cm.gamma: sympy.Rational(1, 5)}) == sympy.Rational(17, 30)


def test_proxy_site_bytes_uses_rounded_sizes():
    from pop_fx.tools.costmodel import proxy_site_bytes, site_cost

    dense = site_cost("gated", 576, 1536, 0.5, 1.0).dense_bytes["fp32"]
    assert proxy_site_bytes("gated", 576, 1536, 0.5, 1.0) * 3 == dense * 2  # 3·768·576·4 + 2·1536·576 = 2/3 dense
    # d_ff 1000, r 0.33, γ 0.5: n_keep = 670, n_C = 500
    assert proxy_site_bytes("gated", 8, 1000, 0.33, 0.5, "int8-gate") == 3 * 670 * 8 * 4 + 500 * 8


def test_frontier_script_table(tmp_path, capsys):
    import json

    from examples.proxy_frontier import main

    res = {"results": [{"method": "dense", "gamma": None, "sparsity": 0.0, "perplexity": 10.0},
                       {"method": "pop-0.2", "gamma": 0.2, "sparsity": 0.5, "perplexity": 20.0},
                       {"method": "proxy-1", "gamma": 1.0, "sparsity": 0.5, "perplexity": 11.0}]}
    (tmp_path / "e.json").write_text(json.dumps(res))
    assert main([str(tmp_path / "e.json"), "--out", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "| pop-0.2 | 0.566 | 20.00 | 2.000 | no |" in out and "| proxy-1 | 0.667 | 11.00 | 1.100 | no |" in out
    assert (tmp_path / "f.png").stat().st_size > 0


def test_budget_bytes_of_the_uniform_sizes_is_site_cost():
    sz = partition_sizes(1536, 0.5, 0.1)
    c = costmodel.site_cost("gated", 576, 1536, 0.5, 0.1)
    assert costmodel.budget_bytes("gated", 576, [sz] * 30) == 30 * c.pop_bytes["fp32"]
    assert costmodel.budget_bytes("gated", 576, [sz], bytes_per_element=2) == c.pop_bytes["bf16"]


@given(st.data(), st.integers(2, 8), st.integers(16, 400), st.floats(0.1, 0.9), st.sampled_from([0.0, 0.1, 0.2, 2.0]),
       st.sampled_from(["gated", "plain"]))
def test_an_allocation_reads_the_uniform_bytes(data, n_sites, d_ff, rv, gv, kind):
    import torch

    from pop_fx.allocation import allocate

    scores = [torch.tensor(data.draw(st.lists(st.floats(0, 100), min_size=d_ff, max_size=d_ff))) for _ in range(n_sites)]
    sizes = allocate("mass", scores, [d_ff] * n_sites, rv, gv)
    uniform = [partition_sizes(d_ff, rv, gv)] * n_sites
    assert costmodel.budget_bytes(kind, 64, sizes) == costmodel.budget_bytes(kind, 64, uniform)
