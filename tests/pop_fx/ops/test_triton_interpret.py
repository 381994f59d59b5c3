"""Triton kernels against their torch references on the CPU, through Triton's interpreter (small shapes), under
the installed Triton and under Triton 3.6 (the GPU machine's: ``_triton36.py``), both with this venv's numpy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import _triton36  # noqa: E402  (tests/pop_fx/ops is on sys.path)

ROOT = Path(__file__).resolve().parents[3]
# One rounding of the output at its scale (fp32 accumulation in every kernel), plus fp32's own error.
TOL = {"torch.float32": 1e-5, "torch.bfloat16": 2.0 ** -7, "torch.float16": 2.0 ** -10}
# torch ops the decode op's Triton path used to run between its kernels (mask multiply, concatenation, pad, split
# sum, cast, bias add, top-k, scatter): the mask now rides the GEMV's load and a finishing kernel does the rest
UNFUSED = {"mul", "cat", "constant_pad_nd", "pad", "sum", "add", "_to_copy", "topk", "scatter", "scatter_"}


def _run_cases(env):
    # TRITON_INTERPRET is read when a kernel is defined, so the cases run in their own process.
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_cases.py"))],
                          env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _bad(cases):
    return [c for c in cases if c["nan"] or c["err"] > TOL[c["dtype"]] * (1 + c["scale"])]


@pytest.fixture(scope="module")
def cases():
    return _run_cases(dict(os.environ, PYTHONPATH=str(ROOT)))


def test_every_kernel_and_dtype_ran(cases):
    assert {(c["kernel"], c["dtype"]) for c in cases} >= {
        (k, d) for k in ("gemv", "gemv_masked", "select", "decode", "rows_gemv", "rows_gemv_int8", "pair_gemv_offs",
                       "proxy_int8", "proxy_int3", "proxy_select_int8", "proxy_select_int3") for d in TOL}
    assert {c["kernel"] for c in cases} >= {"decode_launches", "decode_wide_band"}


def test_kernels_match_reference(cases):
    bad = _bad(cases)
    assert not bad, bad


def test_proxy_scores_are_fp32_accurate_whatever_the_input_dtype(cases):
    # the proxy kernel's inputs are exact in every dtype (x as given, integer proxy values) and it writes fp32
    # scores: only fp32 accumulation error remains, far below bf16's rounding
    proxy = [c for c in cases if c["kernel"] in ("proxy_int8", "proxy_int3")]
    assert len(proxy) == 30 and not [c for c in proxy if c["err"] > 1e-5 * (1 + c["scale"])]


def test_rows_gemv_reads_the_weights_once_for_a_decode_batch(cases):
    """Batches 1, 3 and 8 run one batch block (each gathered weight row read once for every row); 17 runs two."""
    rows = [c for c in cases if c["kernel"] == "rows_gemv"]
    assert {c["shape"][0] for c in rows} >= {1, 3, 8, 17}
    for c in rows:
        (name, grid), = c["grids"]
        B, k = c["shape"][0], c["shape"][3]
        assert name == "_rows_gemv_kernel" and grid == [-(-k // 32), 1 if B <= 16 else 2], c


def test_pair_gemv_skips_the_pairs_past_the_last_offset(cases):
    pairs = [c for c in cases if c["kernel"] == "pair_gemv_offs"]
    assert len(pairs) == 9 and all(c["skipped_untouched"] for c in pairs)


def test_decode_triton_path_is_three_launches_and_no_torch_op_between(cases):
    runs = [c for c in cases if c["kernel"] == "decode_launches"]
    assert len(runs) == 2
    for c in runs:
        assert c["kernels"] == ["_select_kernel", "_gemv_kernel", "_gemv_finish_kernel"], c
        assert not UNFUSED & set(c["aten"]), c["aten"]


def test_decode_triton_path_serves_a_band_wider_than_the_select_kernel(cases):
    """A 7B model at γ 0.6 (n_C 8602 > SELECT_MAX): torch.topk ranks, the fused GEMV projects — it raised before."""
    wide = [c for c in cases if c["kernel"] == "decode_wide_band"]
    assert len(wide) == 2 and all(c["shape"][2] == 8602 for c in wide) and not _bad(wide)


def test_every_case_passes_under_triton_3_6():
    """The same cases with Triton 3.6's interpreter and this venv's numpy (2.4: its interpreter's ``int(array)``
    on range bounds failed there until ``pop_fx.ops._triton`` patched it)."""
    if _triton36.is_current():
        pytest.skip("this is the Triton 3.6 run")
    cases36 = _run_cases(_triton36.env())
    assert len(cases36) >= 160 and not _bad(cases36), _bad(cases36)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_proxy_select_on_cuda_matches_its_cpu_body_int8_int3_gate_only():
    import torch

    from pop_fx.lowbit import quantize_rows, quantize_rows_int3
    from pop_fx.ops.proxy_select import proxy_select

    g = torch.Generator().manual_seed(1)
    d, d_ff, n_R, n_C, k = 256, 96, 10, 61, 20
    for quant in (quantize_rows, quantize_rows_int3):
        for both in (True, False):
            for B in (1, 3):
                x = torch.randn(B, 1, d, generator=g).to(torch.bfloat16)
                q, s = quant(torch.randn(2 * d_ff if both else d_ff, d, generator=g))
                rc_idx = torch.randperm(d_ff, generator=g)[: n_R + n_C][None]
                wn = torch.rand(1, n_C, generator=g) + 0.1
                args = [x, q, s, rc_idx, wn]
                want = proxy_select(*args, n_R, k, d_ff, 0).sort().values
                got = proxy_select(*[t.cuda() for t in args], n_R, k, d_ff, 0).sort().values.cpu()
                assert torch.equal(got, want), (quant.__name__, both, B)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_decode_op_on_cuda_matches_reference():
    import torch

    from pop_fx.ops.decode import decode, decode_reference

    h = torch.randn(2, 1, 845, device="cuda")
    wd_rc = torch.randn(576, 845, device="cuda")
    wn = torch.rand(154, device="cuda") + 0.1
    for kernels in (0, 1):
        torch.testing.assert_close(decode(h, wd_rc, None, wn, 691, 77, kernels),
                                   decode_reference(h, wd_rc, None, wn, 691, 77), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_proxy_ops_on_cuda_match_their_cpu_bodies():
    import torch

    from pop_fx.lowbit import quantize_rows
    from pop_fx.ops.decode_sel import decode_sel
    from pop_fx.ops.gather_in import gather_in
    from pop_fx.ops.proxy_select import proxy_select

    g = torch.Generator().manual_seed(0)
    d, d_ff, n_R, n_C, k = 64, 96, 10, 60, 20
    x = torch.randn(2, 1, d, generator=g)
    gate, up = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g)
    q, s = (torch.cat(t) for t in zip(quantize_rows(gate), quantize_rows(up)))
    rc_idx = torch.randperm(d_ff, generator=g)[: n_R + n_C][None]
    wn = torch.rand(1, n_C, generator=g) + 0.1
    w_in, wd_rc = torch.randn(2 * (n_R + n_C), d, generator=g), torch.randn(d, n_R + n_C, generator=g)
    cpu = [x, q, s, rc_idx, wn, w_in, wd_rc]
    cuda = [t.cuda() for t in cpu]
    for (x_, q_, s_, rc_, wn_, w_, wd_), dev in ((cpu, "cpu"), (cuda, "cuda")):
        sel = proxy_select(x_, q_, s_, rc_, wn_, n_R, k, d_ff, 0)
        z = gather_in(x_, w_, None, sel, n_R, n_R + n_C, 2)
        y = decode_sel(torch.nn.functional.silu(z[..., : n_R + k]) * z[..., n_R + k:], wd_, None, sel, n_R, n_C)
        if dev == "cpu":
            want = (sel.sort().values, y)
        else:
            assert torch.equal(sel.sort().values.cpu(), want[0])
            torch.testing.assert_close(y.cpu(), want[1], atol=1e-3, rtol=1e-3)
