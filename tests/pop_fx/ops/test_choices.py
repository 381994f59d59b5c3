"""Equivalence is the autotuner's contract: every choice of every ``pop::`` op (``pop_fx.autotune``) equals the op's
definition within its dtype's tolerance, over odd shapes, fp32 and bf16, batch 1, 3 and 8 — whichever Inductor
picks, the model computes the same function.

The torch-family choices run here; the Triton-family ones (CUDA kernels) run on CPU tensors under Triton's
interpreter in a subprocess (``_choice_cases.py``), and their kernels compile ahead of time for sm_90 in
``test_triton_sm90.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _choice_cases import TOL, all_cases, error, op_of, run_choice
from pop_fx import autotune

ROOT = Path(__file__).resolve().parents[3]
CASES = all_cases()


def _family(case) -> str:
    return autotune.registry()[op_of(case[0])].by_name(case[1]).family


@pytest.fixture(scope="module")
def interpreted():
    """The Triton choices' results under TRITON_INTERPRET=1, keyed like the parametrized cases."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_choice_cases.py"))],
                          env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{Path(__file__).parent}"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(c["family"], c["choice"], c["dtype"], c["batch"]): c for c in json.loads(proc.stdout)}


def test_every_op_with_two_implementations_offers_them():
    names = {op: [c.name for c in o.choices] for op, o in autotune.registry().items()}
    assert names == {
        "pop::decode": ["masked", "gather_mm", "gather_sum", "masked_reduce", "triton_splitk"],
        "pop::decode_seq": ["masked", "gather", "gather_sum", "triton_splitk"],
        "pop::experts_decode": ["grouped_mm", "bmm", "pair_loop", "triton_pair"],
        "pop::values_decode": ["ebag", "masked", "gather_sum", "reduce_ebag", "reduce_masked", "reduce_gather_sum"],
        "pop::proxy_select": ["torch", "triton_fused"],
        "pop::linear": ["mm", "reduce"],
    }


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_choice_equals_the_definition(case, request):
    family, choice, dtype, B = case
    if _family(case) == "triton":
        rec = request.getfixturevalue("interpreted")[case]
        assert rec["fail"] is None, rec["fail"]
        assert rec["launches"] > 0  # a Triton kernel ran (the interpreter), not a torch fallback
        err, scale = rec["err"], rec["scale"]
    else:
        got, ref = run_choice(family, choice, dtype, B)
        assert got.shape == ref.shape and got.dtype in (torch.int64, torch.float32, torch.bfloat16)
        err, _ = error(family, got, ref)
        scale = 0.0 if family.startswith("proxy_select") else ref.abs().max().item()
    allowed = 0.0 if family.startswith("proxy_select") else TOL[dtype] * (1 + scale)
    assert err <= allowed, (err, allowed)


def test_a_wrong_candidate_exceeds_the_tolerance():
    """The negative control: the decode choices with the best candidate swapped for the worst leave the tolerance."""
    from _choice_cases import decode_case
    from pop_fx import partition as P

    for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        args, ref = decode_case(3, dt)
        h = args["h_rc"].reshape(3, -1)
        n_R, k = args["n_R"], args["n_select"]
        order = P.rank(P.candidate_scores(h[:, n_R:], args["wd_norm_c"])).tolist()
        sel = [c for c in P.select(h[:, n_R:], args["wd_norm_c"], k).tolist() if c != order[0]] + [order[-1]]
        keep = list(range(n_R)) + [n_R + c for c in sel]
        wrong = h.double()[:, keep] @ args["wd_rc"].double()[:, keep].t() + args["bd"].double()
        assert (wrong.reshape(ref.shape) - ref).abs().max().item() > TOL[key] * (1 + ref.abs().max().item())
