"""The autotuned lowering (``pop_fx.autotune``): under ``kernels="auto"`` Inductor benchmarks every choice that serves
an op's inputs and inlines the winner; a pinned family or choice is inlined as named; the backend's pass writes the
config's code into the graph (and into Inductor's cache keys); a torch without the autotuner or without a way to
inline falls back to today's dispatch; the decisions reach ``pop_fx.report``."""

import re

import pytest
import torch

import pop_fx
from pop_fx import PopConfig, autotune

pytestmark = pytest.mark.compile


def _decode_args(B=1, dt=torch.float32):
    g = torch.Generator().manual_seed(0)
    n_R, n_C, N = 37, 19, 64
    return (torch.randn(B, 1, n_R + n_C, generator=g).to(dt), torch.randn(N, 64, generator=g).to(dt), None,
            torch.rand(n_C, generator=g) + 0.1, n_R, 7)


def _compiled(code, args):
    """pop::decode with ``kernels=code`` through stock Inductor (no pop backend), caches off; (output, its code)."""
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        fn = torch.compile(lambda h, w, wn: torch.ops.pop.decode(h, w, None, wn, args[4], args[5], code),
                           backend="inductor", fullgraph=True)
        return run_and_get_code(fn, args[0], args[1], args[3])


def _last(op="pop::decode"):
    return [d for d in autotune.decisions() if d.op == op][-1]


def test_auto_benchmarks_every_serving_choice_and_inlines_the_winner():
    args = _decode_args(B=3)
    autotune.clear()
    got, code = _compiled(autotune.AUTO, args)
    d = _last()
    assert d.how == "measured" and set(d.times_ms) == {"masked", "gather_mm", "gather_sum", "masked_reduce"}  # CPU: no Triton choice
    assert d.choice == min(d.times_ms, key=d.times_ms.__getitem__) and all(t > 0 for t in d.times_ms.values())
    assert not any(re.search(r"torch\.ops\.pop\.decode\.default\(", c) for c in code)  # inlined, not an extern call
    want = torch.ops.pop.decode(*args)
    assert (got - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())


def test_cpu_choices_are_timed_with_cold_caches(monkeypatch):
    # a decode step meets its weights in DRAM: every CPU choice is timed by cold_cpu_time (caches flushed),
    # and Inductor's own benchmarker is itself again afterwards
    from torch._inductor.runtime.benchmarking import benchmarker

    timed = []

    def counting(fn, **kw):
        timed.append(fn)
        return real(fn, **kw)

    real = autotune.cold_cpu_time
    monkeypatch.setattr(autotune, "cold_cpu_time", counting)
    autotune.clear()
    _compiled(autotune.AUTO, _decode_args(B=3))
    assert _last().how == "measured" and len(timed) >= 3  # one per serving choice at least
    assert "benchmark_cpu" not in vars(benchmarker)


def test_cold_cpu_time_runs_one_untimed_call_then_min_runs_timed_ones():
    calls = []
    ms = autotune.cold_cpu_time(lambda: calls.append(1), rep=0.0, min_runs=4, max_runs=4)
    assert ms >= 0 and len(calls) == 5  # one untimed call, then min_runs timed ones


@pytest.mark.parametrize("pin", ["torch", "gather_mm"])
def test_a_pinned_family_or_choice_is_inlined_as_named(pin):
    args = _decode_args()
    code = autotune.TORCH if pin == "torch" else autotune.choice_code("pop::decode", pin)
    autotune.clear()
    got, _ = _compiled(code, args)
    d = _last()
    assert (d.choice, d.how, d.times_ms) == ("masked" if pin == "torch" else pin, "pinned", {})
    want = torch.ops.pop.decode(*args)
    assert (got - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())


def test_without_the_autotuner_auto_is_todays_dispatch(monkeypatch):
    monkeypatch.setattr(autotune, "support", lambda: {"lowering": True, "inline": True, "tune": False})
    args = _decode_args()
    autotune.clear()
    got, code = _compiled(autotune.AUTO, args)
    d = _last()
    assert (d.choice, d.how) == ("masked", "fallback: this torch has no autotuner")
    assert not any("torch.ops.pop.decode.default(" in c for c in code)
    assert torch.allclose(got, torch.ops.pop.decode(*args), atol=1e-5)


def test_without_a_way_to_inline_the_op_stays_an_extern_call(monkeypatch):
    monkeypatch.setattr(autotune, "support", lambda: {"lowering": True, "inline": False, "tune": False})
    args = _decode_args()
    autotune.clear()
    got, code = _compiled(autotune.AUTO, args)
    assert _last().how.startswith("fallback: this torch cannot inline")
    assert any("torch.ops.pop.decode.default(" in c for c in code)  # the eager body: today's dispatch
    assert torch.equal(got, torch.ops.pop.decode(*args))


def test_the_kernels_pass_writes_the_config_code_and_keys_the_caches():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    def graph():
        g = torch.fx.Graph()
        h, w, wn = (g.placeholder(n) for n in ("h", "w", "wn"))
        y = g.call_function(torch.ops.pop.decode.default, (h, w, None, wn, 3, 1, 0))
        s = g.call_function(torch.ops.pop.proxy_select.default, (h, w, w, h, wn, 1, 1, 4, 0))  # no kernels argument
        g.output((y, s))
        return g, y, s

    uuids = set()
    for kernels, want in (("auto", autotune.AUTO), ("torch", autotune.TORCH), ("triton", autotune.TRITON)):
        cfg = PopConfig(kernels=kernels)
        p = autotune.KernelsPass(cfg)
        assert isinstance(p, CustomGraphPass) and p.uuid()  # anything else makes Inductor's FX graph cache bypass
        g, y, s = graph()
        p(g)
        assert y.args[6] == want and s.kwargs["kernels"] == want and y.meta["pop_config"] == cfg
        uuids.add(p.uuid())
    with autotune.pinned({"pop::decode": "gather_sum"}):
        p = autotune.KernelsPass(PopConfig())
    g, y, s = graph()
    p(g)
    assert y.args[6] == autotune.choice_code("pop::decode", "gather_sum") and s.kwargs["kernels"] == autotune.AUTO
    uuids.add(p.uuid())
    assert len(uuids) == 4  # a pinned graph is never served for an autotuned one, nor a family for another
    with pytest.raises(ValueError, match="gather_sum"):
        with autotune.pinned({"pop::decode": "nope"}):
            pass


def test_experts_at_batch_1_choose_among_their_gemvs():
    from _choice_cases import experts_case

    args, ref = experts_case(1, torch.float32)
    names = list(args)
    autotune.clear()
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: torch.ops.pop.experts_decode(*a, kernels=autotune.AUTO), backend="inductor",
                           fullgraph=True)
        got = fn(*(args[n] for n in names))
    d = _last("pop::experts_decode")
    assert d.how == "measured" and set(d.times_ms) == {"grouped_mm", "bmm", "pair_loop"}
    assert (got.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_report_names_the_choice_with_inductors_times():
    from pop_fx.tools.models import tiny_model

    torch._dynamo.reset()
    autotune.clear()
    m = tiny_model("llama")
    ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    pop_fx.compile(m, sparsity=0.5)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    rep = pop_fx.report(m)
    dec = [c for c in rep.choices if c["op"] == "pop::decode" and not c["how"].startswith("earlier")]
    assert dec and dec[0]["how"] in ("measured", "cached") and dec[0]["choice"] in dec[0]["times_ms"]
    assert "pop::decode" in str(rep) and rep.as_dict()["choices"] == rep.choices
    torch._dynamo.reset()
    pop_fx.compile(m, sparsity=0.5, kernels="torch")
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    pinned = [c for c in pop_fx.report(m).choices if not c["how"].startswith("earlier")]
    assert {(c["op"], c["choice"], c["how"]) for c in pinned} == {("pop::decode", "masked", "pinned"),
                                                                   ("pop::linear", "mm", "pinned")}


def test_a_later_graph_hitting_the_cache_keeps_the_first_lowerings_measured_decision():
    """The first and later decode graphs lower the same op and shapes: the second hits the autotune cache the
    first filled, and report() must still say the choice was measured (with the first's times)."""
    autotune.clear()
    try:
        cfg = PopConfig()
        first = autotune.Decision("pop::decode", "h 1x8 f32", "masked", "measured", {"masked": 1.0}, cfg)
        again = autotune.Decision("pop::decode", "h 1x8 f32", "masked", "cached", {"masked": 1.0}, cfg)
        other = autotune.Decision("pop::decode", "h 1x8 f32", "gather_mm", "cached", {"gather_mm": 0.5}, cfg)
        autotune._DECISIONS.extend([first, again])
        assert [d.how for d in autotune.decisions(cfg)] == ["measured"]
        autotune._DECISIONS.append(other)  # a different verdict later: the latest stands
        assert [(d.choice, d.how) for d in autotune.decisions(cfg)] == [("gather_mm", "cached")]
    finally:
        autotune.clear()
