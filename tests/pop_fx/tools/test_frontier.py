"""pop-fx frontier: the pick and the Pareto front on synthetic frontiers, the CLI on a tiny model end to end,
and the packaged text found from a built wheel."""

import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop_fx.tools import frontier as fr

ROOT = Path(__file__).resolve().parents[3]


def _point(i, tps, ppl, agree):
    s = fr.DENSE if i == 0 else fr.Setting(f"pop-{i}", 0.5, 0.1)
    return fr.Point(s, 10 * ppl, ppl, agree, 0.5, tps, tps)


_pts = st.lists(st.tuples(st.floats(0.1, 100), st.floats(1.0, 10), st.floats(0, 1)), min_size=1, max_size=12)


@given(_pts, st.sampled_from(["ppl", "agreement"]), st.floats(0, 1), st.booleans())
def test_pick_is_inside_the_budget_and_nothing_faster_is(raw, metric, frac, with_dense):
    points = [_point(i + 1, *t) for i, t in enumerate(raw)]
    if with_dense:
        points.insert(0, _point(0, 1.0, 1.0, 1.0))
    budget = fr.Budget(metric, 1 + 9 * frac if metric == "ppl" else max(frac, 1e-6))
    pick = fr.recommend(points, budget)
    inside = [p for p in points if budget.admits(p)]
    if not inside:
        assert pick is None and not with_dense  # dense is always inside
        return
    assert pick is not None and budget.admits(pick)
    assert not any(p.tokens_per_s > pick.tokens_per_s for p in inside)


@given(_pts, st.sampled_from(["ppl", "agreement"]))
def test_pareto_front_is_exactly_the_undominated_points(raw, metric):
    points = [_point(i + 1, *t) for i, t in enumerate(raw)]
    q = (lambda p: p.ppl_ratio) if metric == "ppl" else (lambda p: -p.agreement)

    def dominates(a, b):
        return a.tokens_per_s >= b.tokens_per_s and q(a) <= q(b) and (a.tokens_per_s > b.tokens_per_s or q(a) < q(b))

    front = fr.pareto_front(points, metric)
    for p, on in zip(points, front):
        assert on == (not any(dominates(o, p) for o in points if o is not p))
    assert any(front)
    # The fastest point inside any budget is on the front (or tied with one that is).
    budget = fr.Budget(metric, 10.0 if metric == "ppl" else 1e-9)
    pick = fr.recommend(points, budget)
    if pick is None:  # e.g. every point has agreement 0: nothing is inside the budget
        assert not any(fr.usable(p) and budget.admits(p) for p in points)
    else:
        assert any(on and p.tokens_per_s == pick.tokens_per_s for p, on in zip(points, front))


def test_budget_and_settings_parsing():
    assert fr.parse_budget("1.10") == fr.Budget("ppl", 1.1)
    assert fr.parse_budget("0.9") == fr.Budget("agreement", 0.9)
    assert fr.parse_budget("agreement:0.95") == fr.Budget("agreement", 0.95)
    for bad in ("0.5x", "ppl:0.9", "agreement:1.5", "speed:2", "-1"):
        with pytest.raises(ValueError, match="budget"):
            fr.parse_budget(bad)
    s = fr.parse_settings("static@0.2,pop-0.1@0.3,full@0.5,proxy-int3-1@0.5")
    assert [x.label for x in s] == ["dense", "static r=0.2", "pop-0.1 r=0.3", "full r=0.5", "proxy-int3-1 r=0.5"]
    assert s[2].code() == "pop_fx.compile(model, sparsity=0.3, candidate_ratio=0.1)"
    assert s[4].code().endswith("candidate_ratio=1, candidate_proxy='int3')")
    assert len(fr.parse_settings(None, ["static", "pop-0.2"], [0.2, 0.4])) == 5
    for bad in ("wanda-sp@0.5", "pop-0.1", "pop-0.1@x", "pop-0.1@1.5"):
        with pytest.raises(ValueError):
            fr.parse_settings(bad)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rnd = random.Random(0)
    words = ["the", "and", "of", "lord", "said", "unto", "him", "land", "went", "came", "day", "son", "people"]
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text("\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) for _ in range(200)) + "\n")
    return p


def test_cli_end_to_end_on_a_tiny_model(text_file, tmp_path, monkeypatch, capsys):
    from pop_fx.tools.cli import main

    monkeypatch.setenv("POP_FX_CACHE", str(tmp_path / "cache"))
    argv = ["frontier", "--model", "llama", "--text", str(text_file), "--settings", "static@0.5,pop-0.1@0.5",
            "--windows", "2", "--prompt-len", "6", "--cont-len", "4", "--batch-size", "2", "--new-tokens", "3",
            "--rounds", "1", "--lowering", "eager", "--budget", "5", "--out", str(tmp_path / "out"), "--json",
            "--no-progress"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    pts = {p["label"]: p for p in out["points"]}
    assert list(pts) == ["dense", "static r=0.5", "pop-0.1 r=0.5"]
    assert pts["dense"]["ppl_ratio"] == 1.0 and pts["dense"]["agreement"] == 1.0 and pts["dense"]["speedup"] == 1.0
    assert all(p["tokens_per_s"] > 0 and len(p["samples"]) == 1 for p in pts.values())
    rec = out["recommended"]
    assert rec["ppl_ratio"] <= 5 and rec["tokens_per_s"] == max(p["tokens_per_s"] for p in pts.values()
                                                               if p["ppl_ratio"] <= 5)
    for name in ("frontier.json", "frontier.md", "frontier.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0

    # A rerun reads every measurement from the cache: nothing is measured again, the numbers are the same.
    def refuse(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(fr.measure, "measure_speed", refuse)
    import pop_fx.tools.evaluation.harness as harness

    monkeypatch.setattr(harness, "run_rows", refuse)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [p["perplexity"] for p in again["points"]] == [p["perplexity"] for p in out["points"]]
    assert [p["samples"] for p in again["points"]] == [p["samples"] for p in out["points"]]

    # --replot measures nothing: the pick follows the new budget (ppl 1.0: only points as good as dense).
    assert main(["frontier", "--replot", str(tmp_path / "out" / "frontier.json"), "--budget", "1.0", "--json"]) == 0
    replot = json.loads(capsys.readouterr().out)
    assert replot["recommended"]["ppl_ratio"] <= 1.0

    assert main(argv[:-2] + ["--budget", "speed:2"]) == 2
    assert "budget" in capsys.readouterr().err


def test_packaged_text_ships_in_the_wheel(tmp_path):
    """Build a wheel from a copy of the sources, unpack it, and find the default text from there alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("pop_fx", "passes"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, cwd=tmp_path)
    (whl,) = wheels.glob("pop_fx-*.whl")
    with zipfile.ZipFile(whl) as z:
        assert "pop_fx/data/web_bible_sample.txt" in z.namelist()
        z.extractall(tmp_path / "site")
    probe = ("from pop_fx.tools.evaluation.text import default_text_path, read_text; p = default_text_path(); "
             "t, _ = read_text(None); print(p); assert t.startswith('In the beginning, God created'), t[:40]")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(tmp_path / "site")


def test_dense_speed_row_is_compiled_as_pop_with_nothing_pruned(monkeypatch):
    """The baseline gets pop-fx's lowering too: timed against stock Inductor (2x slower GEMVs on SmolLM2), the
    frontier named int8-values 2.56x dense where pop-fx's own dense ran as fast (2026-12-05)."""
    import pop_fx
    from pop_fx.tools.models import tiny_model

    seen = []
    real = pop_fx.compile

    def spy(model, config=None, **kw):
        seen.append(config)
        return real(model, config, **kw)

    monkeypatch.setattr(pop_fx, "compile", spy)
    model = tiny_model("llama")
    settings = [fr.DENSE, fr.Setting("static", 0.5, 0.0)]
    res = fr.measure_speed(model, None, settings, new_tokens=2, rounds=1, lowering="eager")
    assert [c.sparsity for c in seen] == [0.0, 0.5]
    assert all(c.lowering == "eager" for c in seen)
    assert all(len(res[s]["samples"]) == 1 for s in settings)
    assert fr.DENSE.code().startswith("pop_fx.compile(model, sparsity=0)")
