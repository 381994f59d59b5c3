"""examples/gpu_check.py keeps working: its --tiny run (CPU, Triton under the interpreter) writes every section,
in the order that decides defaults, with no error record, and exits non-zero when a record is an error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
ORDER = ["env", "ceiling", "stack", "profile", "moe", "llama7b", "correctness", "timing", "registers", "cuda_tests",
         "drift", "done"]


def _run(out, *args):
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    return subprocess.run([sys.executable, str(ROOT / "examples" / "gpu_check.py"), "--tiny", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out)
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return proc, records


@pytest.fixture(scope="module")
def records(run):
    return run[1]


def test_exits_zero_with_every_section_in_order_and_no_error(run):
    proc, records = run
    errors = [{k: r.get(k) for k in ("section", "name", "variant", "error")} for r in records if r["status"] == "error"]
    assert not errors, errors
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    first = []
    for r in records:
        if r["section"] not in first:
            first.append(r["section"])
    assert first == ORDER, first
    done = records[-1]
    assert done["section"] == "done" and done["errors"] == 0 and done["correctness_failed"] == []
    assert isinstance(done["targets"], list)


def test_an_error_record_fails_the_script(tmp_path):
    """numpy >= 2.4 broke Triton 3.6's interpreter and the script still exited 0 over 70 error records: an error
    now fails it. Here a section that cannot run (no such shape) must make the exit status 1."""
    proc = _run(tmp_path, "--sections", "env,correctness", "--budget", "0")
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    # budget 0: the correctness subprocess is skipped (not an error) -> exit 0
    assert proc.returncode == 0 and records[-1]["errors"] == 0
    proc = _run(tmp_path, "--sections", "env,no_such_section")
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert records[-1]["errors"] == 1 and proc.returncode == 1


def test_correctness_runs_in_a_subprocess_and_covers_every_op(records):
    corr = [r for r in records if r["section"] == "correctness"]
    assert corr and all(r["pass"] for r in corr if "pass" in r), [r for r in corr if r.get("pass") is False]
    ran = {(r["name"], r["kernels"]) for r in corr if "kernels" in r}
    for op in ("pop::decode", "pop::decode_seq", "pop::experts_decode"):
        assert {(op, "torch"), (op, "triton")} <= ran
    for name in ("pop::proxy_select", "pop::gather_in", "pop::decode_sel", "gemv_triton", "select_triton",
                 "select_torch", "rows_gemv_triton", "rows_gemv_triton_int8", "pair_gemv_triton"):
        assert any(n == name for n, _ in ran), name
    assert len({(tuple(r["shape"]), r["batch"]) for r in corr if r["name"] == "pop::decode"}) == 4


def test_stack_cells_run_every_variant_back_to_back_and_match_eager(records):
    stack = [r for r in records if r["section"] == "stack" and "step_ms" in r]
    cells = {(r["cuda_graphs"], r["batch"]) for r in stack}
    assert cells == {(True, 1), (True, 8), (False, 1), (False, 8)}
    for cell in cells:
        assert {r["variant"] for r in stack if (r["cuda_graphs"], r["batch"]) == cell} == {
            "dense", "pop-torch", "pop-triton", "autotuned"}
    assert all(r["pass"] and r["step_ms"] > 0 and r["mutated_input_warnings"] >= 0 for r in stack)
    assert all("speedup_vs_dense" in r for r in stack if r["variant"] != "dense")
    tuned = [r for r in stack if r["variant"] == "autotuned"]  # Inductor's choice per op, recorded
    assert tuned and all(any(c["op"] == "pop::decode" for c in r["choices"]) for r in tuned)


def test_profile_moe_llama_ceiling_and_drift_recorded(records):
    prof = {r["variant"]: r for r in records if r["section"] == "profile" and r["status"] == "ok"}
    assert {"dense", "pop-torch", "pop-triton"} <= set(prof) and all(p["total"] > 0 for p in prof.values())
    assert all(set(p["kinds"]) <= {"gemv", "select", "small"} for p in prof.values())
    moe = {r["variant"]: r for r in records if r["section"] == "moe"}
    assert {"dense", "pop-torch", "pop-triton"} <= set(moe) and all(m["pass"] and m["prefill_ms"] > 0 for m in moe.values())
    llama = {r["variant"]: r for r in records if r["section"] == "llama7b"}
    assert {"dense", "pop-torch", "pop-triton"} <= set(llama) and all(v["ttft_ms"] > 0 for v in llama.values())
    ceiling = [r for r in records if r["section"] == "ceiling"]
    assert ceiling[0]["read_gbps"] > 0 and ceiling[0]["copy_gbps"] > 0
    assert [r for r in records if r["section"] == "drift"][0]["read_vs_start"] > 0


def test_timings_recorded(records):
    timing = {r["name"] for r in records if r["section"] == "timing" and r["status"] == "ok"}
    assert {"dense_down F.linear", "ideal_down F.linear n_keep", "pop::decode kernels=torch",
            "pop::decode kernels=triton", "gemv_triton (R ∪ C layout)", "select_triton"} <= timing
