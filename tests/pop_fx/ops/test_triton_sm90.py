"""Every Triton kernel compiles ahead of time for Hopper (sm_90) at the block sizes the launchers use, spills
nothing, is software-pipelined where it streams weights, ranks with an exact square root, and says in its PTX
which eviction hints survive — checks that need no GPU, under both Triton versions the project supports: the
installed one (3.9 here) and 3.6, the GPU machine's (``test_every_check_passes_under_triton_3_6`` runs this file
again in a subprocess with Triton 3.6 first on the path: ``_triton36.py``).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` gives TTGIR and PTX on this CPU machine;
Triton's bundled ``ptxas-blackwell`` assembles the PTX for sm_90a and reports registers, spills and barriers.
The interpreter (test_triton_interpret.py) checks the numbers; this checks that the kernels lower for Hopper
and what they cost in registers. Neither measures speed (examples/gpu_check.py does, on a lent GPU).
"""

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pop_fx.ops import rows_gemv as RG, splitk_gemv as S  # noqa: E402

import _triton36  # noqa: E402  (tests/pop_fx/ops is on sys.path: rootdir conftest-less import mode)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not os.path.exists(PTXAS),
                                reason="needs triton's bundled ptxas-blackwell and a compiling (not interpreting) triton")
DIV16 = [["tt.divisibility", 16]]  # what Triton's JIT infers for 16-byte-aligned pointers and strides
TRITON = ".".join(triton.__version__.split(".")[:2])
# Whether Triton lowers a load's eviction_policy onto the cp.async copies of a pipelined loop (PTX
# ``cp.async...L2::cache_hint`` with a ``createpolicy...evict_first`` policy): 3.9 does, 3.6 drops the hint.
HINTS_ON_ASYNC_COPIES = {"3.6": False, "3.9": True}


def _compile(fn, signature, constexprs, aligned, num_warps=4, tmp_path=None):
    attrs = {(list(signature).index(a),): DIV16 for a in aligned}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = tmp_path / "k.ptx"
    ptx.write_text(k.asm["ptx"])
    r = subprocess.run([PTXAS, "-v", "-arch=sm_90a", str(ptx), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    return k, regs, spills


def _exact_root(ptx):
    """Kernels that rank must take torch's (correctly rounded) square root: an approximate one moves near-ties."""
    assert "sqrt.approx" not in ptx and "sqrt.rn.f32" in ptx


def _weights_evict_first(ptx):
    """The weights' evict-first hint is in the PTX of their async copies exactly where this Triton lowers it.
    (An activation tile that cannot be copied asynchronously — an unaligned row — is a plain ``ld.global``, which
    keeps its evict-last hint under both versions.)"""
    if TRITON not in HINTS_ON_ASYNC_COPIES:
        pytest.skip(f"eviction-hint lowering not recorded for triton {TRITON}")
    assert "cp.async.cg.shared.global" in ptx
    lowered = HINTS_ON_ASYNC_COPIES[TRITON]
    assert ("createpolicy.fractional.L2::evict_first" in ptx) == lowered
    assert ("cp.async.cg.shared.global.L2::cache_hint" in ptx) == lowered


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("x_aligned", [False, True], ids=["x-any", "x-aligned"])
def test_splitk_gemv_compiles_for_sm90_pipelined_without_spills(dtype, masked, x_aligned, tmp_path):
    import torch

    sig = {"x_ptr": f"*{dtype}", "m_ptr": "*fp32", "w_ptr": f"*{dtype}", "part_ptr": "*fp32", "B": "i32", "N": "i32",
           "K": "i32", "Kx": "i32", "n_R": "i32", "stride_xb": "i32", "stride_wn": "i32", "k_per_split": "i32",
           "MASKED": "constexpr", "BLOCK_B": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
           "NUM_STAGES": "constexpr", "IEEE": "constexpr", "UPCAST": "constexpr"}
    block_k, warps = S.gemv_tile({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    cst = dict(MASKED=masked, BLOCK_B=S.BLOCK_B, BLOCK_N=S.BLOCK_N, BLOCK_K=block_k, NUM_STAGES=S.NUM_STAGES,
               IEEE=dtype == "fp32", UPCAST=False)
    # wd_rc's rows are padded to 16 elements (layout.ROW_ALIGN), so K and its stride are multiples of 16, as is
    # k_per_split (a multiple of BLOCK_K); x's width, row stride and n_R are whatever the step's h has (h over
    # R ∪ C is n_R + n_C wide): Triton's JIT specializes on both cases
    aligned = ["x_ptr", "m_ptr", "w_ptr", "part_ptr", "K", "stride_wn", "k_per_split"]
    aligned += ["stride_xb", "Kx", "n_R"] if x_aligned else []
    k, regs, spills = _compile(S._gemv_kernel, sig, cst, aligned, num_warps=warps, tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255
    ttgir = k.asm["ttgir"]
    # the weight and activation (and mask) tiles stream through NUM_STAGES shared-memory buffers with async copies
    assert ttgir.count("ttg.async_copy_global_to_local") >= (3 if masked else 2) and "ttg.async_wait" in ttgir
    if dtype != "fp32":  # tensor-core products (the batch padded to 16 rows); fp32 keeps exact FMA products
        assert "mma" in ttgir
    _weights_evict_first(k.asm["ptx"])


def test_gemv_finish_kernel_compiles_for_sm90_without_spills(tmp_path):
    sig = {"part_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "BN": "i32", "N": "i32", "SPLIT": "i32",
           "HAS_BIAS": "constexpr", "BLOCK_F": "constexpr"}
    _, regs, spills = _compile(S._gemv_finish_kernel, sig, dict(HAS_BIAS=True, BLOCK_F=S.BLOCK_F),
                               ["part_ptr", "bias_ptr", "y_ptr"], tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255


@pytest.mark.parametrize("block", [1024, 2048, 4096, 8192])
def test_select_compiles_for_sm90_without_spills_and_ranks_exactly(block, tmp_path):
    sig = {"h_ptr": "*bf16", "wn_ptr": "*fp32", "mask_ptr": "*fp32", "B": "i32", "n_R": "i32", "n_C": "i32",
           "k": "i32", "stride_hb": "i32", "BLOCK_C": "constexpr"}
    k, regs, spills = _compile(S._select_kernel, sig, {"BLOCK_C": block}, ["h_ptr", "wn_ptr", "mask_ptr"],
                               num_warps=S.select_warps(block), tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255
    _exact_root(k.asm["ptx"])


@pytest.mark.parametrize("w_dtype,x_dtype,y_dtype,scale", [("bf16", "bf16", "bf16", False), ("i8", "bf16", "fp32", True),
                                                           ("fp32", "fp32", "fp32", False)])
def test_rows_gemv_compiles_for_sm90_pipelined_without_spills(w_dtype, x_dtype, y_dtype, scale, tmp_path):
    sig = {"x_ptr": f"*{x_dtype}", "w_ptr": f"*{w_dtype}", "s_ptr": "*fp32", "rows_ptr": "*i64", "y_ptr": f"*{y_dtype}",
           "B": "i32", "n_rows": "i32", "K": "i32", "stride_xb": "i32", "stride_w": "i32", "stride_yb": "i32",
           "HAS_SCALE": "constexpr", "BLOCK_B": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
           "NUM_STAGES": "constexpr", "IEEE": "constexpr"}
    import torch

    block_k, warps = RG.rows_tile(torch.float32 if x_dtype == "fp32" else torch.bfloat16)
    cst = dict(HAS_SCALE=scale, BLOCK_B=RG.BLOCK_B, BLOCK_R=RG.BLOCK_R, BLOCK_K=block_k, NUM_STAGES=RG.NUM_STAGES,
               IEEE=x_dtype == "fp32")
    # K is d_model (a multiple of 16 in every model: Triton's JIT marks it so), and the rows' strides with it
    k, regs, spills = _compile(RG._rows_gemv_kernel, sig, cst, ["x_ptr", "w_ptr", "s_ptr", "rows_ptr", "y_ptr", "K",
                                                                "stride_xb", "stride_w"], num_warps=warps, tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255
    ttgir = k.asm["ttgir"]
    # the gathered weight rows and the batch's x stream through shared-memory stages: one read for all rows
    assert ttgir.count("ttg.async_copy_global_to_local") >= 2 and "ttg.async_wait" in ttgir
    if x_dtype != "fp32":
        assert "mma" in ttgir


def test_pair_gemv_compiles_for_sm90_without_spills(tmp_path):
    from pop_fx.ops import experts_decode as X

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "e_ptr": "*i64", "offs_ptr": "*i32", "y_ptr": "*bf16", "N": "i32",
           "K": "i32", "E": "i32", "stride_xp": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_yp": "i32",
           "HAS_OFFS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    _, regs, spills = _compile(X._pair_gemv_kernel, sig, dict(HAS_OFFS=True, BLOCK_N=X.PAIR_BLOCK_N,
                                                              BLOCK_K=X.PAIR_BLOCK_K),
                               ["x_ptr", "w_ptr", "y_ptr", "stride_xp", "stride_we", "stride_wn"], tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255


def _proxy_sig(int3, dtype):
    import torch

    from pop_fx.ops import proxy_kernels as PK

    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*u8" if int3 else "*i8", "s_ptr": "*fp32", "c_ptr": "*i64",
           "wn_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "n_C": "i32", "D8" if int3 else "K": "i32",
           "d_ff": "i32", "stride_xb": "i32", "stride_q": "i32"}
    if int3:
        sig["stride_p"] = "i32"
    sig["k_per_split"] = "i32"
    block, stages = PK.tiles_for(int3, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    sig.update({c: "constexpr" for c in ("ACT", "BOTH", "FUSED", "KEYS", "BLOCK_B", "BLOCK_C",
                                         "BLOCK_J" if int3 else "BLOCK_K", "NUM_STAGES", "IEEE", "UPCAST")})
    return PK, sig, block, stages


@pytest.mark.parametrize("int3", [False, True], ids=["int8", "int3"])
@pytest.mark.parametrize("dtype,fused,act", [("bf16", True, 0), ("bf16", False, 2), ("fp16", False, 1),
                                             ("fp32", True, 3), ("fp32", False, 0)])
def test_proxy_kernel_compiles_for_sm90_pipelined_without_spills(int3, dtype, fused, act, tmp_path):
    PK, sig, block, stages = _proxy_sig(int3, dtype)  # the launcher's tile and stages for this format and dtype
    cst = dict(ACT=act, BOTH=True, FUSED=fused, KEYS=fused, BLOCK_B=PK.BLOCK_B, BLOCK_C=PK.BLOCK_C, NUM_STAGES=stages,
               IEEE=dtype == "fp32", UPCAST=False, **{"BLOCK_J" if int3 else "BLOCK_K": block})
    # the proxy rows and planes are 16-byte aligned at model shapes (d a multiple of 128), as are x's rows
    aligned = ["x_ptr", "q_ptr", "s_ptr", "c_ptr", "wn_ptr", "out_ptr", "stride_xb", "stride_q", "k_per_split"]
    aligned += ["D8", "stride_p"] if int3 else ["K"]
    kern = PK._proxy_int3_kernel if int3 else PK._proxy_int8_kernel
    k, regs, spills = _compile(kern, sig, cst, aligned, tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255
    ttgir = k.asm["ttgir"]
    # the gate and up tiles (3 planes each for int3) and the x tiles stream through NUM_STAGES - 1 shared-memory
    # buffers filled by async copies; the products run on the tensor cores (fp32 x as three bf16 parts)
    n_loads = 7 if int3 else 3  # per K step: x (int3: 8 slices, one buffer) + gate + up (int3: 3 planes each)
    assert ttgir.count("ttg.async_copy_global_to_local") >= n_loads and "ttg.async_wait" in ttgir
    assert f"memdesc<{stages - 1}x{PK.BLOCK_C}x{block}xi8" in ttgir
    assert "nvidia_mma" in ttgir
    if fused:  # the one-launch variant scores and ranks
        _exact_root(k.asm["ptx"])
    if not int3:
        _weights_evict_first(k.asm["ptx"])


def test_proxy_finish_kernel_compiles_for_sm90_without_spills(tmp_path):
    from pop_fx.ops import proxy_kernels as PK

    sig = {"part_ptr": "*fp32", "s_ptr": "*fp32", "c_ptr": "*i64", "wn_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32",
           "n_C": "i32", "d_ff": "i32", "SPLIT": "i32", "ACT": "constexpr", "BOTH": "constexpr", "KEYS": "constexpr",
           "BLOCK_F": "constexpr"}
    k, regs, spills = _compile(PK._proxy_finish_kernel, sig, dict(ACT=1, BOTH=True, KEYS=True, BLOCK_F=PK.BLOCK_F),
                               ["part_ptr", "s_ptr", "c_ptr", "wn_ptr", "out_ptr"], tmp_path=tmp_path)
    assert spills == [0, 0] and regs <= 255
    _exact_root(k.asm["ptx"])


def test_every_check_passes_under_triton_3_6(tmp_path):
    """This file again with Triton 3.6 (the GPU machine's) first on the path: the select kernel spilled at 8192
    lanes there (48 bytes) while it compiled clean with 3.9."""
    if _triton36.is_current():
        pytest.skip("this is the Triton 3.6 run")
    env = _triton36.env()
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-W", "ignore::UserWarning", __file__, "-k", "not under_triton_3_6",
                           "--basetemp", str(tmp_path / "t36")], cwd=_triton36.ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "3.6" in subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                                   capture_output=True, text=True).stdout


def test_inductor_sees_the_proxy_kernels_write_only_their_output():
    """Inside ``pop::proxy_select`` Inductor analyses each wrapped kernel's TTIR for the tensors it writes; a kernel
    it cannot analyse counts as writing every argument (the proxy copy included). The stores sit in nested jit
    functions (the epilogue): the analysis must still find out_ptr alone. TTIR for sm_90, no GPU needed."""
    import torch

    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    if not hasattr(wrap, "identify_accessed_tensors"):
        pytest.skip("this torch has no identify_accessed_tensors")
    from pop_fx.ops import proxy_kernels as PK

    class _Sm90:  # generate_ttir asks the active driver for its target; this machine has none
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    x, s, c, wn = torch.randn(1, 2048, dtype=torch.bfloat16), torch.rand(200), torch.arange(50), torch.rand(50)
    part = torch.empty(8, 2, 1, 50)
    common = dict(x_ptr=x, s_ptr=s, c_ptr=c, wn_ptr=wn, out_ptr=part, B=1, n_C=50, d_ff=100, stride_xb=2048,
                  stride_q=2048, k_per_split=256, ACT=0, BOTH=True, KEYS=True, BLOCK_B=16, BLOCK_C=32, NUM_STAGES=4,
                  IEEE=False, UPCAST=False)
    cases = [(PK._proxy_int8_kernel, dict(q_ptr=torch.zeros(200, 2048, dtype=torch.int8), K=2048, BLOCK_K=256)),
             (PK._proxy_int3_kernel, dict(q_ptr=torch.zeros(200, 3, 256, dtype=torch.uint8), D8=256, stride_p=256,
                                          BLOCK_J=32))]
    drivers = triton.runtime.driver
    before = drivers.__dict__.get("_active")
    drivers.set_active(_Sm90())
    try:
        for kern, kw in cases:
            for fused in (False, True):
                acc = wrap.identify_accessed_tensors(kern, {**common, **kw, "FUSED": fused}, {})
                assert sorted(d.name for d in acc.read_writes.writes) == ["out_ptr"], (kern, fused)
        acc = wrap.identify_accessed_tensors(PK._proxy_finish_kernel, dict(
            part_ptr=part, s_ptr=s, c_ptr=c, wn_ptr=wn, out_ptr=torch.empty(50), B=1, n_C=50, d_ff=100, SPLIT=8,
            ACT=1, BOTH=True, KEYS=False, BLOCK_F=256), {})
        assert sorted(d.name for d in acc.read_writes.writes) == ["out_ptr"]
    finally:  # (reset_active() would build the default driver, which needs a GPU)
        drivers._active = before
