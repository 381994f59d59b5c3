"""examples/gpu_check.py keeps working: its --tiny run (CPU, Triton under the interpreter) writes every section."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"env", "copy", "correctness", "timing", "stack", "profile", "cuda_tests", "done"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gpu_check.py"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = (out / "gpu_check.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_every_section_and_no_error(records):
    assert {r["section"] for r in records} == SECTIONS
    errors = [r for r in records if r["status"] == "error"]
    assert not errors, errors
    done = [r for r in records if r["section"] == "done"]
    assert len(done) == 1 and done[0]["errors"] == 0 and records[-1] is done[0]
    assert done[0]["correctness_failed"] == [] and isinstance(done[0]["targets"], list)


def test_correctness_covers_every_op_and_passes(records):
    corr = [r for r in records if r["section"] == "correctness"]
    assert corr and all(r["pass"] for r in corr), [r for r in corr if not r["pass"]]
    ran = {(r["name"], r["kernels"]) for r in corr}
    for op in ("pop::decode", "pop::decode_seq", "pop::experts_decode"):
        assert {(op, "torch"), (op, "triton")} <= ran
    for name in ("pop::proxy_select", "pop::gather_in", "pop::decode_sel", "gemv_triton", "select_triton",
                 "select_torch", "rows_gemv_triton", "rows_gemv_triton_int8", "pair_gemv_triton"):
        assert any(n == name for n, _ in ran), name
    # both shapes and both batches of every op
    assert len({(tuple(r["shape"]), r["batch"]) for r in corr if r["name"] == "pop::decode"}) == 4


def test_timings_stack_and_profile_recorded(records):
    timing = {r["name"] for r in records if r["section"] == "timing" and r["status"] == "ok"}
    assert {"dense_down F.linear", "ideal_down F.linear n_keep", "pop::decode kernels=torch",
            "pop::decode kernels=triton", "gemv_triton (R ∪ C layout)", "select_triton"} <= timing
    stack = [r for r in records if r["section"] == "stack" and "variant" in r and "step_ms" in r]
    assert {(r["variant"], r["cuda_graphs"]) for r in stack} >= {("dense-inductor", False), ("pop", False),
                                                                 ("dense-inductor", True), ("pop", True)}
    assert all(r["step_ms"] > 0 for r in stack)
    assert any("speedup_vs_dense" in r for r in stack)
    prof = {r["variant"]: r for r in records if r["section"] == "profile"}
    assert set(prof) == {"dense-inductor", "pop"} and all(p["total"] > 0 for p in prof.values())
    copy = [r for r in records if r["section"] == "copy"]
    assert copy[0]["gbps"] > 0
