"""One prepared GPU run of pop-fx that decides the CUDA defaults within one short lease (~8 minutes with the start).

Run it on the device machine (an H200, torch 2.11 / triton 3.6 / transformers 5.17, Python 3.12, no internet) from
the source tree, with a timeout of about 380 s:

    OUT=$OUT PYTHONPATH=. python examples/gpu_check.py

It starts no new item past ``--budget`` seconds of work (default 300) and writes ``$OUT/gpu_check.jsonl`` (``--out``
overrides), one JSON object a line, flushed as it goes, so a timeout keeps every finished line. Each record has
``section`` and ``status`` ("ok", "error" or "skipped"); an exception in one item is an ``error`` record with its
traceback and the run goes on. The exit status is 1 if any record is an error or a failed correctness check.

Sections, in the order that decides defaults first (docs/gpu.md has the same list and how to read it):

* ``env``         — torch / triton / transformers / Python versions, GPU, SMs, L2, memory; ``nvidia-smi`` clocks,
                    temperature, power and throttle reasons.
* ``ceiling``     — the read-only memory bandwidth (a sum over a buffer far larger than L2: bytes read / s; a
                    copy's read + write GB/s beside it). Every GB/s below is compared with the read-only figure.
* ``stack``       — an 8-layer 1B-shaped FFN stack, one decode step, per cell (CUDA graphs on/off × batch 1/8,
                    graphs first) the variants back to back: dense Inductor, POP kernels="torch", POP
                    kernels="triton" and ``autotuned`` (kernels="auto": Inductor's autotuner picks, its choices
                    and benchmark times recorded). Each variant's decode output is checked against the same POP graph run eagerly
                    (``lowering="eager"``, torch ops) or, for dense, the uncompiled model; compile time, median
                    step, GB/s, speedup over dense and the targets; Inductor's "assuming every input is mutated"
                    warnings counted while compiling; under CUDA graphs the skipped-graph and copied-input counters.
* ``profile``     — kernel-only times of one decode step per variant from one profiler pass over a CUDA-graph
                    replay (batch 1): the GEMVs, the select and the small launches, separately.
* ``registers``   — registers, spills and shared memory of every Triton kernel as compiled on the device.
* ``moe``         — an OLMoE-like MoE stack (64 experts, top-8, d 2048, d_ff 1024, Qwen3-MoE blocks), dense
                    Inductor vs POP: decode step at batch 1 and a 512-token prefill (POP's partition and layout
                    copies included: the TTFT cost).
* ``llama7b``     — a 7B-shaped Llama (d 4096, d_ff 14336, 2 layers, random weights) end to end: ``generate()``
                    time to first token and decode ms/token, dense Inductor vs POP.
* ``correctness`` — in a subprocess (a sticky CUDA error there voids nothing here): every decode op and Triton
                    kernel at the 1B and 7B shapes, batch 1 and 8, against float64.
* ``timing``      — CUDA-event micro-timings of the kernels on rotating weight sets (no L2 hits), eager and from
                    a CUDA graph, beside dense cuBLAS and the contiguous n_keep GEMV.
* ``cuda_tests``  — the suite's CUDA-only tests (``pytest -k cuda``), in a subprocess, last.
* ``drift``       — the ceiling and ``nvidia-smi`` again: how far the machine moved during the run.
* ``done``        — wall time, error count, failed correctness checks and the targets as measured.

``--tiny`` (automatic without CUDA) runs every section on tiny shapes on the CPU, the Triton kernels under
``TRITON_INTERPRET=1`` (set before triton is imported) and each timing a couple of iterations, so CI keeps this
script working (``tests/pop_fx/test_gpu_check.py``) and fails on any error record.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

T0 = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, Triton under its interpreter")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else the current folder)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new item starts (default 300 on a GPU, 900 with --tiny)")
    p.add_argument("--sections", default=None, help="comma-separated subset of the sections (default all)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a subprocess section: append, no done
    return p.parse_args(argv)


ARGS = parse_args()
CUDA = torch.cuda.is_available()
TINY = ARGS.tiny or not CUDA
if TINY:  # before triton is imported anywhere: kernels defined from here on run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # no compile-worker pool to start for a few tiny graphs
DEVICE = "cpu" if TINY else "cuda"
BUDGET = ARGS.budget if ARGS.budget is not None else (900.0 if TINY else 300.0)

import torch.nn.functional as F  # noqa: E402

DTYPE = torch.bfloat16
R, GAMMA = 0.5, 0.1
SHAPES = {"tiny": (64, 256), "tiny-odd": (96, 352)} if TINY else {"1b": (2048, 5632), "7b": (4096, 14336)}
BATCHES = (1, 8)
STACK_LAYERS = 2 if TINY else 8
STACK_SHAPE = (64, 256) if TINY else (2048, 5632)
# (CUDA graphs, batch) cells of the stack, in the order they decide defaults: a serving decode step runs under CUDA
# graphs at batch 1 first. Every variant of a cell runs back to back (one compile each), so a cell compares like
# with like on one machine state.
STACK_CELLS = ((True, 1), (True, 8), (False, 1), (False, 8))
VARIANTS = ("dense", "pop-torch", "pop-triton", "autotuned")
# The autotuned variant's PopConfig fields: kernels="auto" is Inductor's autotuner choosing among the decode ops'
# implementations (pop_fx.autotune: on CUDA the torch bodies and the Triton kernels); None skips the variant.
AUTOTUNED = dict(kernels="auto")
MOE_SHAPE = "tiny" if TINY else "olmoe"  # pop_fx.tools.bench_moe.MOE_SHAPES: d 2048, 64 experts of 1024, top-8
MOE_LAYERS = 2 if TINY else 4
LLAMA = (dict(hidden_size=64, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
         if TINY else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000))
LLAMA_LAYERS = 2
# bf16: one rounding of the output at its scale (fp32 accumulation everywhere), twice for slack; a wrong candidate
# row moves an output by |h_c|·|Wd[:, c]| ~ 3/sqrt(d_ff) of the scale, several times this.
TOL = {torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -12}
STACK_TOL = 2.0 ** -6  # the compiled stack against its eager run: 8 layers of bf16 residual adds, fused differently
# The autotuned variant may take pop::linear's reduction for the R ∪ C gate/up rows: its outputs round differently
# from the eager run's F.linear, which can flip a near-tie candidate of one layer (2.0e-2 of the scale at the tiny
# CPU shape, 2026-12-05); each choice against its definition is tests/pop_fx/ops/test_choices.py's job.
STACK_TOL_AUTOTUNED = 2.0 ** -5
L2_BYTES = 50 * 2**20
CEIL_GBPS = None  # the read-only ceiling, measured by the ceiling section
MUTATED_WARNING = "assuming every input is mutated"


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _clean(v.item())
    return v


class Log:
    def __init__(self, path, append=False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        if not append:
            open(path, "w").close()
        self.f = open(path, "a")  # append mode: a subprocess section's lines land after ours, never overwritten
        self.errors = 0
        self.targets = []  # the targets as measured: one short line each, repeated in the done record
        self.failed = []  # correctness records that did not pass

    def count(self, rec):
        if rec.get("status") == "error":
            self.errors += 1
        if "target_met" in rec:
            self.targets.append({k: rec.get(k) for k in ("section", "name", "variant", "shape", "batch", "cuda_graphs",
                                                         "target_met", "frac_of_ceiling", "speedup_vs_dense", "ratio")
                                 if rec.get(k) is not None})
        if rec.get("pass") is False:
            self.failed.append({k: rec.get(k) for k in ("section", "name", "variant", "shape", "batch", "kernels",
                                                        "rel_err", "mismatched") if rec.get(k) is not None})

    def write(self, section, status="ok", **fields):
        rec = _clean(dict(section=section, status=status, t=round(time.perf_counter() - T0, 2), **fields))
        self.count(rec)
        self.f.write(json.dumps(rec, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        brief = {k: v for k, v in rec.items() if k not in ("traceback", "samples", "kernels", "top")}
        print(json.dumps(brief, default=str)[:400], flush=True)

    def error(self, section, exc, **fields):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.write(section, "error", error=f"{type(exc).__name__}: {exc}"[:2000], traceback=tb[-4000:], **fields)


OUT_DIR = ARGS.out or os.environ.get("OUT") or "."
LOG = Log(os.path.join(OUT_DIR, "gpu_check.jsonl"), append=ARGS.child)

try:  # the library: a failure here is still a record
    import pop_fx  # noqa: F401  (registers the pop:: ops)
    from pop_fx import partition as P
    from pop_fx.lowbit import quantize_rows, quantize_rows_int3, unpack_int3
    from pop_fx.ops import layout
    from pop_fx.ops.decode import candidate_mask, decode_reference, decode_triton
    from pop_fx.ops.decode_seq import decode_seq_reference, keep_indices
    from pop_fx.ops.proxy_kernels import proxy_grid, proxy_scores_triton
    from pop_fx.ops.proxy_select import proxy_select_triton
    from pop_fx.ops.rows_gemv import rows_gemv_triton
    from pop_fx.ops.splitk_gemv import gemv_triton, select_triton, split_for
except Exception as _exc:  # noqa: BLE001
    LOG.error("import", _exc)
    LOG.write("done", wall_s=time.perf_counter() - T0, errors=LOG.errors, sections=[])
    raise


def remaining() -> float:
    return BUDGET - (time.perf_counter() - T0)


def guarded(section, fn, *args, **fields):
    """Run one item; an exception becomes an error record. Returns fn's result or None."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - every failure is a record, the run goes on
        LOG.error(section, exc, **fields)
        if CUDA:
            try:
                torch.cuda.synchronize()
            except Exception as sticky:  # noqa: BLE001 - a sticky CUDA error: later items will say so too
                LOG.error(section, sticky, note="synchronize after the error failed")
        return None


def budget_left(section, need, **fields) -> bool:
    """Whether an item estimated at ``need`` seconds (GPU; a fifth of it with --tiny) still fits; else a skip record."""
    need = need / 5 if TINY else need
    if remaining() >= need:
        return True
    LOG.write(section, "skipped", reason="budget", needed_s=need, remaining_s=remaining(), **fields)
    return False


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# env, the read-only ceiling, drift
# ------------------------------------------------------------------------------------------------


def nvidia_smi() -> dict:
    """Clocks, temperature, power and throttle reasons as the card reports them (read only: nothing is set)."""
    fields = ("clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw", "power.limit",
              "clocks_throttle_reasons.active", "utilization.gpu")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return dict(nvidia_smi=f"unavailable: {exc}")
    if out.returncode != 0:
        return dict(nvidia_smi=f"exit {out.returncode}: {out.stderr.strip()[:200]}")
    vals = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip((f.replace(".", "_") for f in fields), vals))


def section_env():
    global L2_BYTES
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    rec = dict(torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
               numpy=numpy.__version__, python=platform.python_version(), cuda_runtime=torch.version.cuda, tiny=TINY,
               device=DEVICE, triton_interpret=os.environ.get("TRITON_INTERPRET"), budget_s=BUDGET, shapes=SHAPES,
               stack=dict(shape=STACK_SHAPE, layers=STACK_LAYERS), r=R, gamma=GAMMA, dtype=str(DTYPE),
               cpu_threads=torch.get_num_threads())
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        L2_BYTES = getattr(props, "L2_cache_size", 0) or L2_BYTES
        rec.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=L2_BYTES,
                   bf16_reduced_precision_reduction=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        rec.update(nvidia_smi())
    LOG.write("env", **rec)


def measure_ceiling() -> dict:
    """Read-only GB/s: ``sum`` over 2 GiB (two 1 GiB buffers alternated, far beyond L2), median of 7; and a copy's
    (read + write) GB/s beside it."""
    n = (4 if TINY else 1024) * 2**20 // 4
    bufs = [torch.empty(n, dtype=torch.float32, device=DEVICE).normal_() for _ in range(2)]
    reps = 2 if TINY else 7
    it = [0]

    def read():
        bufs[it[0] % 2].sum()
        it[0] += 1

    read_s = statistics.median(time_region(read, 2 if TINY else 10) for _ in range(reps))
    dst = torch.empty_like(bufs[0])
    copy_s = statistics.median(time_region(lambda: dst.copy_(bufs[1]), 2 if TINY else 10) for _ in range(reps))
    return dict(bytes=n * 4, read_gbps=n * 4 / read_s / 1e9, copy_gbps=2 * n * 4 / copy_s / 1e9)


def section_ceiling():
    global CEIL_GBPS
    rec = measure_ceiling()
    CEIL_GBPS = rec["read_gbps"]
    LOG.write("ceiling", **rec, note="read_gbps: bytes read / s (what a GEMV does); copy_gbps counts read + write")


def section_drift():
    rec = measure_ceiling()
    if CEIL_GBPS:
        rec["read_vs_start"] = rec["read_gbps"] / CEIL_GBPS
    if CUDA:
        rec.update(nvidia_smi())
    LOG.write("drift", **rec)


def time_region(fn, iters: int) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls: CUDA events on a GPU, perf_counter on the CPU."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


# ------------------------------------------------------------------------------------------------
# problems: one site's state at a shape, built by the library's own prefill-time layout code
# ------------------------------------------------------------------------------------------------


def _gen(seed):
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    return g


def make_problem(d, f, B, seed=0):
    """Weights, a batch-scope partition's state (layout.write_partition), per-sequence state and activations."""
    g = _gen(seed)
    dev = DEVICE
    sizes = P.partition_sizes(f, R, GAMMA)
    n_R, n_C, n_sel = sizes.n_R, sizes.n_C, sizes.n_select
    n_rc = n_R + n_C
    gate = (torch.randn(f, d, generator=g, device=dev) * d ** -0.5).to(DTYPE)
    up = (torch.randn(f, d, generator=g, device=dev) * d ** -0.5).to(DTYPE)
    wd = (torch.randn(d, f, generator=g, device=dev) * f ** -0.5).to(DTYPE)
    wd_norm = P.down_column_norm(wd)
    scores = torch.rand(f, generator=g, device=dev)
    rc_idx = torch.zeros(1, n_rc, dtype=torch.long, device=dev)
    wd_norm_c = torch.zeros(1, n_C, dtype=torch.float32, device=dev)
    w_in = torch.zeros(2 * n_rc, d, dtype=DTYPE, device=dev)
    b_in = torch.zeros(2 * n_rc, dtype=DTYPE, device=dev)
    wd_rc = torch.zeros(d, layout.padded(n_rc), dtype=DTYPE, device=dev)
    layout.write_partition(scores, sizes, wd, gate, None, up, None, wd_norm, rc_idx, wd_norm_c, w_in, b_in, wd_rc, 0)
    seq_rc = torch.zeros(B, n_rc, dtype=torch.long, device=dev)  # scope="sequence": one partition per sequence
    seq_wn_c = torch.zeros(B, n_C, dtype=torch.float32, device=dev)
    e = torch.zeros(0, device=dev)
    layout.write_partition(torch.rand(B, f, generator=g, device=dev), sizes, wd, gate, None, up, None, wd_norm,
                           seq_rc, seq_wn_c, e, e, e, 0)
    x = torch.randn(B, 1, d, generator=g, device=dev).to(DTYPE)
    h_rc = torch.randn(B, 1, n_rc, generator=g, device=dev).to(DTYPE)
    h_full = torch.randn(B, 1, f, generator=g, device=dev).to(DTYPE)
    q, s = quantize_rows(torch.cat([gate, up]))
    q3, s3 = quantize_rows_int3(torch.cat([gate, up]))
    return dict(q3=q3, s3=s3,
                d=d, f=f, B=B, sizes=sizes, n_R=n_R, n_C=n_C, n_sel=n_sel, n_rc=n_rc, gate=gate, up=up, wd=wd,
                wd_norm=wd_norm, rc_idx=rc_idx, wd_norm_c=wd_norm_c, w_in=w_in, b_in=b_in, wd_rc=wd_rc,
                seq_rc=seq_rc, x=x, h_rc=h_rc, h_full=h_full, q=q, s=s)


def masked_seq(h, wd_norm, rc_idx, n_R, n_sel):
    """decode_seq's Triton input: each sequence's unselected channels zeroed (its keep_indices)."""
    h2 = h.reshape(h.shape[0], h.shape[-1])
    return h2 * torch.zeros_like(h2).scatter_(1, keep_indices(h2, wd_norm, rc_idx, n_R, n_sel), 1.0)


def sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132


# ------------------------------------------------------------------------------------------------
# correctness against float64
# ------------------------------------------------------------------------------------------------


def _close(name, shape, B, kernels, got, ref, tol_rel, **extra):
    got64, ref64 = got.double(), ref.double()
    scale = ref64.abs().max().item()
    err = (got64 - ref64).abs().max().item() if got.shape == ref.shape else float("inf")
    tol = tol_rel * max(scale, 1e-30)
    ok = bool(got.shape == ref.shape and not torch.isnan(got64).any() and err <= tol)
    LOG.write("correctness", name=name, shape=shape, batch=B, kernels=kernels, max_abs_err=err, ref_max=scale,
              tol=tol, rel_err=err / max(scale, 1e-30), **{"pass": ok}, **extra)
    return ok


def _same_set(name, shape, B, kernels, got_pos, ref_pos, ref_scores, **extra):
    """Selected positions against the float64 ranking's; a difference only among scores within 1e-4 (relative)
    of the k-th best is a tie at fp32 precision, not an error (reported as ``near_ties``)."""
    got_s, ref_s = set(got_pos.reshape(-1).tolist()), set(ref_pos.reshape(-1).tolist())
    diff = sorted(got_s ^ ref_s)
    near = False
    if diff:
        k = len(ref_s)
        kth = ref_scores.sort(descending=True).values[k - 1].item()
        near = all(abs(ref_scores[i].item() - kth) <= 1e-4 * abs(kth) for i in diff)
    ok = len(got_s) == len(ref_s) and (not diff or near)
    LOG.write("correctness", name=name, shape=shape, batch=B, kernels=kernels, n_selected=len(got_s),
              mismatched=len(diff), near_ties=bool(diff and near), **{"pass": ok}, **extra)
    return ok


def check_shape(shape_name, d, f, B):
    pb = make_problem(d, f, B, seed=hash((d, f, B)) % 1000)
    tol = TOL[DTYPE]
    n_R, n_C, n_sel = pb["n_R"], pb["n_C"], pb["n_sel"]
    ops = torch.ops.pop
    on_gpu = DEVICE == "cuda"
    shape = [d, f]
    sect = "correctness"

    # the Triton kernels themselves (on the CPU under the interpreter)
    h2 = pb["h_rc"].reshape(B, -1)
    guarded(sect, lambda: _close("gemv_triton", shape, B, "triton", gemv_triton(h2, pb["wd_rc"]),
                                 h2.double() @ pb["wd_rc"][:, : pb["n_rc"]].double().t(), tol,
                                 grid=[math.ceil(d / 64), split_for(d, pb["wd_rc"].shape[1], sm_count())]),
            name="gemv_triton", shape=shape, batch=B)
    wn_c = pb["wd_norm_c"].reshape(-1)
    ref_scores = torch.linalg.vector_norm(h2[:, n_R:].double(), dim=0) * wn_c.double()
    ref_pos = P.top_k(ref_scores, n_sel)

    def sel_triton():
        masked = select_triton(h2, wn_c, n_R, n_sel)
        return (masked[:, n_R:] != 0).any(0).nonzero().reshape(-1)  # h is randn: no exact zeros

    guarded(sect, lambda: _same_set("select_triton", shape, B, "triton", sel_triton(), ref_pos, ref_scores),
            name="select_triton", shape=shape, batch=B)
    guarded(sect, lambda: _same_set("select_torch", shape, B, "torch",
                                    P.candidate_topk(h2[:, n_R:], wn_c, n_sel), ref_pos, ref_scores),
            name="select_torch", shape=shape, batch=B)
    rows = layout.kept_rows(torch.arange(n_sel, device=DEVICE) * 2 % n_C, n_R, pb["n_rc"], 2)
    x2 = pb["x"].reshape(B, d)
    guarded(sect, lambda: _close("rows_gemv_triton", shape, B, "triton", rows_gemv_triton(x2, pb["w_in"], rows),
                                 x2.double() @ pb["w_in"][rows].double().t(), tol),
            name="rows_gemv_triton", shape=shape, batch=B)
    c_rows = torch.cat([pb["rc_idx"][0, n_R:], pb["rc_idx"][0, n_R:] + f])
    guarded(sect, lambda: _close("rows_gemv_triton_int8", shape, B, "triton",
                                 rows_gemv_triton(x2, pb["q"], c_rows, pb["s"], torch.float32),
                                 x2.double() @ (pb["q"][c_rows].double() * pb["s"][c_rows].double()[:, None]).t(),
                                 TOL[torch.float32]),
            name="rows_gemv_triton_int8", shape=shape, batch=B)

    # pop::decode (scope="batch"): kernels torch and triton
    ref = decode_reference(pb["h_rc"].double(), pb["wd_rc"].double(), None, pb["wd_norm_c"], n_R, n_sel)
    for kern, code in (("torch", 0), ("triton", 1)):
        def run_decode(code=code):
            if code == 1 and not on_gpu:  # the op runs its torch body on the CPU: call its Triton path directly
                return decode_triton(pb["h_rc"], pb["wd_rc"], None, pb["wd_norm_c"], n_R, n_sel)
            return ops.decode(pb["h_rc"], pb["wd_rc"], None, pb["wd_norm_c"], n_R, n_sel, code)
        guarded(sect, lambda: _close("pop::decode", shape, B, kern, run_decode(), ref, tol),
                name="pop::decode", shape=shape, batch=B, kernels=kern)

    # pop::decode_seq (scope="sequence")
    ref = decode_seq_reference(pb["h_full"].double(), pb["wd"].double(), None, pb["wd_norm"], pb["seq_rc"], n_R,
                               n_sel, 0)
    for kern, code in (("torch", 0), ("triton", 1)):
        def run_seq(code=code):
            if code == 1 and not on_gpu:
                y = gemv_triton(masked_seq(pb["h_full"], pb["wd_norm"], pb["seq_rc"], n_R, n_sel), pb["wd"])
                return y.reshape(B, 1, d)
            return ops.decode_seq(pb["h_full"], pb["wd"], None, pb["wd_norm"], pb["seq_rc"], n_R, n_sel, 0, code)
        guarded(sect, lambda: _close("pop::decode_seq", shape, B, kern, run_seq(), ref, tol),
                name="pop::decode_seq", shape=shape, batch=B, kernels=kern)

    # the proxy ops (candidate_proxy="int8"): on CUDA their bodies launch rows_gemv's kernel, on the CPU torch
    kern_proxy = "triton" if on_gpu else "torch"
    c_idx = pb["rc_idx"][0, n_R:]
    z_px = x2.double() @ (pb["q"][c_rows].double() * pb["s"][c_rows].double()[:, None]).t()
    h_px = F.silu(z_px[:, :n_C]) * z_px[:, n_C:]  # the int8 proxy's activations of C, in float64
    px_scores = torch.linalg.vector_norm(h_px, dim=0) * wn_c.double()
    sel_ref = P.top_k(px_scores, n_sel)
    sel = guarded(sect, lambda: ops.proxy_select(pb["x"], pb["q"], pb["s"], pb["rc_idx"], pb["wd_norm_c"], n_R,
                                                 n_sel, f, 0), name="pop::proxy_select", shape=shape, batch=B)
    if sel is not None:
        guarded(sect, lambda: _same_set("pop::proxy_select", shape, B, kern_proxy, sel, sel_ref, px_scores),
                name="pop::proxy_select", shape=shape, batch=B)
    # the fused proxy-scoring kernel (proxy_kernels.py: the op's CUDA body) on the int8 rows and the int3 bit planes:
    # its fp32 scores against float64 ones from the same proxy values, and the op's selection against float64's
    for fmt, q_, s_ in (("int8", pb["q"], pb["s"]), ("int3", pb["q3"], pb["s3"])):
        vals = (unpack_int3(q_, d) if q_.dim() == 3 else q_).double() * s_.double()[:, None]
        z64 = x2.double() @ vals[c_rows].t()
        sc64 = torch.linalg.vector_norm(F.silu(z64[:, :n_C]) * z64[:, n_C:], dim=0) * wn_c.double()
        guarded(sect, lambda q_=q_, s_=s_, fmt=fmt, sc64=sc64: _close(
            f"proxy_scores_triton {fmt}", shape, B, "triton", proxy_scores_triton(x2, q_, s_, c_idx, wn_c, f, 0), sc64,
            TOL[torch.float32], plan=proxy_grid(n_C, B, d, fmt == "int3", sms=sm_count())),
            name=f"proxy_scores_triton {fmt}", shape=shape, batch=B)

        def px_sel(q_=q_, s_=s_):  # the op's CUDA body (on the CPU: that body itself, under the interpreter)
            if on_gpu:
                return ops.proxy_select(pb["x"], q_, s_, pb["rc_idx"], pb["wd_norm_c"], n_R, n_sel, f, 0)
            return proxy_select_triton(x2, q_, s_, c_idx, wn_c, n_sel, f, 0)
        guarded(sect, lambda px_sel=px_sel, fmt=fmt, sc64=sc64: _same_set(
            f"pop::proxy_select {fmt}", shape, B, "triton", px_sel(), P.top_k(sc64, n_sel), sc64),
            name=f"pop::proxy_select {fmt}", shape=shape, batch=B)
    sel = sel_ref  # the next ops' reference and input: the float64 ranking's choice
    kept = layout.kept_rows(sel, n_R, pb["n_rc"], 2)
    guarded(sect, lambda: _close("pop::gather_in", shape, B, kern_proxy,
                                 ops.gather_in(pb["x"], pb["w_in"], None, sel, n_R, pb["n_rc"], 2),
                                 pb["x"].double() @ pb["w_in"][kept].double().t(), tol),
            name="pop::gather_in", shape=shape, batch=B)
    h_sel = torch.randn(B, 1, n_R + n_sel, generator=_gen(7), device=DEVICE).to(DTYPE)
    keep_cols = torch.cat([torch.arange(n_R, device=DEVICE), n_R + sel])
    guarded(sect, lambda: _close("pop::decode_sel", shape, B, "torch",
                                 ops.decode_sel(h_sel, pb["wd_rc"], None, sel, n_R, n_C),
                                 h_sel.double() @ pb["wd_rc"][:, keep_cols].double().t(), tol),
            name="pop::decode_sel", shape=shape, batch=B)


def _ternary(shape, density, scale, g):
    """Entries in {-scale, 0, scale}, nonzero with probability ``density``."""
    keep = torch.rand(*shape, generator=g, device=DEVICE) < density
    sign = torch.where(torch.rand(*shape, generator=g, device=DEVICE) < 0.5, -1.0, 1.0)
    return (keep * sign * scale).to(DTYPE)


def check_experts(B):
    """pop::experts_decode (kernels torch and triton) against the per-expert loop in float64: a small MoE block.

    Its gate/up products are exact in bf16 (ternary hidden states, 16 nonzero ±1/8 weights a row, ReLU: every
    act(gate)·up is k/64 with |k| <= 256), so bf16 rounding inside the op cannot reorder the candidates and the
    float64 loop must pick the same ones; the down projection and the routing weights are arbitrary bf16."""
    from pop_fx.ops.experts_decode import experts_decode_loop, experts_decode_pairs, pair_gemv_triton

    E, H, I, k = (4, 64, 96, 2) if TINY else (16, 2048, 1024, 4)
    g = _gen(11)
    sizes = P.partition_sizes(I, R, GAMMA)
    n_rc = sizes.n_R + sizes.n_C
    gate_up = _ternary((E, 2 * I, H), 16 / H, 0.125, g)
    down = (torch.randn(E, H, I, generator=g, device=DEVICE) * I ** -0.5).to(DTYPE)
    wd_norm = P.down_column_norm(down)
    rc_idx = torch.zeros(E, 1, n_rc, dtype=torch.long, device=DEVICE)
    wd_norm_c = torch.zeros(E, 1, sizes.n_C, dtype=torch.float32, device=DEVICE)
    dense = torch.zeros(E, 1, dtype=torch.bool, device=DEVICE)
    w_in = torch.zeros(E, 2 * n_rc, H, dtype=DTYPE, device=DEVICE)
    wd_rc = torch.zeros(E, H, layout.padded(n_rc), dtype=DTYPE, device=DEVICE)
    for e in range(E):
        layout.write_expert_partition(e, torch.rand(1, I, generator=g, device=DEVICE), torch.zeros(1, dtype=torch.bool,
                                      device=DEVICE), sizes, gate_up, down, wd_norm, rc_idx, wd_norm_c, dense, w_in,
                                      wd_rc)
    hidden = _ternary((B, H), 1.0, 1.0, g)
    logits = torch.randn(B, E, generator=g, device=DEVICE)
    w, idx = torch.softmax(logits, -1).topk(k, -1)
    args = (hidden, idx, w.to(DTYPE), gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_rc, sizes.n_R,
            sizes.n_select, "relu", False)
    d64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = experts_decode_loop(*d64)
    shape = [E, H, I, k]
    for kern, code in (("torch", 0), ("triton", 1)):
        guarded("correctness", lambda code=code, kern=kern: _close(
            "pop::experts_decode", shape, B, kern,
            torch.ops.pop.experts_decode(*args, False, code) if DEVICE == "cuda" else experts_decode_pairs(*args, False, code),
            ref, TOL[DTYPE], effective="torch (the CPU runs the op's torch body)" if DEVICE != "cuda" else kern),
            name="pop::experts_decode", shape=shape, batch=B, kernels=kern)
    # the op's Triton kernel itself (on the CPU under the interpreter): each pair through its expert's R ∪ C rows
    pairs = idx.reshape(-1).sort().values
    xp = torch.randn(pairs.numel(), H, generator=g, device=DEVICE).to(DTYPE)
    guarded("correctness", lambda: _close("pair_gemv_triton", shape, B, "triton", pair_gemv_triton(xp, w_in, pairs),
                                          torch.einsum("pnk,pk->pn", w_in[pairs].double(), xp.double()), TOL[DTYPE]),
            name="pair_gemv_triton", shape=shape, batch=B)


def correctness_here():
    for name, (d, f) in SHAPES.items():
        for B in BATCHES:
            guarded("correctness", check_shape, name, d, f, B, name="shape", shape=[d, f], batch=B)
    for B in BATCHES:
        guarded("correctness", check_experts, B, name="pop::experts_decode", batch=B)


# ------------------------------------------------------------------------------------------------
# micro-timings: rotating weight sets, eager and CUDA-graph replay
# ------------------------------------------------------------------------------------------------


def _n_sets(bytes_per_set: int) -> int:
    if TINY:
        return 2
    if bytes_per_set <= 0:  # nothing to rotate (the select kernels read activations only)
        return 2
    return max(2, math.ceil(3 * L2_BYTES / max(bytes_per_set, 1)))


def time_rotating(make_set, fn, bytes_per_set: int, read_bytes: int):
    """Per-call seconds of ``fn(*set)``, each call on the next set: (eager, graph replay) medians and samples."""
    n = _n_sets(bytes_per_set)
    sets = [make_set(i) for i in range(n)]
    calls = n if TINY else n * max(1, math.ceil(24 / n))
    for s in sets[:2]:  # compile / autotune / warm
        fn(*s)
    sync()

    def loop():
        for i in range(calls):
            fn(*sets[i % n])

    reps = 2 if TINY else 7
    eager = [time_region(loop, 1) / calls for _ in range(reps)]
    out = dict(sets=n, set_mib=bytes_per_set / 2**20, calls_per_sample=calls, eager_us=statistics.median(eager) * 1e6,
               eager_samples_us=[t * 1e6 for t in eager])
    if DEVICE == "cuda":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                loop()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop()
            graph.replay()
            sync()
            gt = [time_region(graph.replay, 3) / calls for _ in range(reps)]
            out.update(graph_us=statistics.median(gt) * 1e6, graph_samples_us=[t * 1e6 for t in gt])
            del graph
        except Exception as exc:  # noqa: BLE001
            out.update(graph_error=f"{type(exc).__name__}: {exc}"[:500])
    best = out.get("graph_us") or out["eager_us"]
    out["gbps"] = read_bytes / (best / 1e6) / 1e9
    if CEIL_GBPS:
        out["frac_of_ceiling"] = out["gbps"] / CEIL_GBPS
    del sets
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def time_shape(shape_name, d, f, B):
    sizes = P.partition_sizes(f, R, GAMMA)
    n_R, n_C, n_sel, n_keep = sizes.n_R, sizes.n_C, sizes.n_select, sizes.n_keep
    n_rc = n_R + n_C
    n_pad = layout.padded(n_rc)
    e = DTYPE.itemsize if hasattr(DTYPE, "itemsize") else 2
    g = _gen(3)
    dev = DEVICE
    ops = torch.ops.pop
    rn = lambda *s: torch.randn(*s, generator=g, device=dev).to(DTYPE)  # noqa: E731
    wn_c = torch.rand(1, n_C, generator=g, device=dev) + 0.1
    wd_norm = torch.rand(f, generator=g, device=dev) + 0.1
    rc_idx = torch.stack([torch.randperm(f, generator=g, device=dev)[:n_rc].sort().values for _ in range(B)])
    h_rc, h_full, h_keep, x = rn(B, 1, n_rc), rn(B, 1, f), rn(B, n_keep), rn(B, 1, d)
    rows_c = torch.cat([rc_idx[0, n_R:], rc_idx[0, n_R:] + f])
    sel = torch.randperm(n_C, generator=g, device=dev)[:n_sel]
    d8 = -(-d // 8)

    def int8_set(i):
        return (torch.randint(-127, 128, (2 * f, d), generator=g, device=dev, dtype=torch.int8),
                torch.rand(2 * f, generator=g, device=dev) * 0.01)

    def int3_set(i):  # random bit planes: every value in [-3, 3]
        return (torch.randint(0, 256, (2 * f, 3, d8), generator=g, device=dev, dtype=torch.uint8),
                torch.rand(2 * f, generator=g, device=dev) * 0.01)

    s6 = P.partition_sizes(f, R, 0.6)
    rc6 = torch.randperm(f, generator=g, device=dev)[: s6.n_R + s6.n_C].sort().values[None]
    wn6 = torch.rand(1, s6.n_C, generator=g, device=dev) + 0.1
    rows6 = torch.cat([rc6[0, s6.n_R:], rc6[0, s6.n_R:] + f])
    base = dict(shape=shape_name, d=d, d_ff=f, batch=B, n_keep=n_keep, n_R=n_R, n_C=n_C, n_select=n_sel)
    dense_bytes, keep_bytes = d * f * e, d * n_keep * e
    items = [
        # name, bytes of one weight set, weight bytes one call streams (its design's), make_set, fn
        ("dense_down F.linear", dense_bytes, dense_bytes, lambda i: (rn(d, f),),
         lambda w: F.linear(h_full, w)),
        ("ideal_down F.linear n_keep", keep_bytes, keep_bytes, lambda i: (rn(d, n_keep),),
         lambda w: F.linear(h_keep, w)),
        ("pop::decode kernels=torch", d * n_pad * e, d * n_rc * e, lambda i: (rn(d, n_pad),),
         lambda w: ops.decode(h_rc, w, None, wn_c, n_R, n_sel, 0)),
        ("pop::decode kernels=triton", d * n_pad * e, d * n_rc * e, lambda i: (rn(d, n_pad),),
         lambda w: ops.decode(h_rc, w, None, wn_c, n_R, n_sel, 1) if DEVICE == "cuda"
         else decode_triton(h_rc, w, None, wn_c, n_R, n_sel)),
        ("gemv_triton (R ∪ C layout)", d * n_pad * e, d * n_rc * e, lambda i: (rn(d, n_pad),),
         lambda w: gemv_triton(h_rc.reshape(B, n_rc), w)),
        ("F.linear (R ∪ C layout)", d * n_pad * e, d * n_rc * e, lambda i: (rn(d, n_pad),),
         lambda w: F.linear(h_rc.reshape(B, n_rc), w[:, :n_rc])),
        ("select_triton", 0, 0, lambda i: (), lambda: select_triton(h_rc.reshape(B, n_rc), wn_c.reshape(-1), n_R, n_sel)),
        ("select torch.topk + mask", 0, 0, lambda i: (), lambda: candidate_mask(h_rc.reshape(B, n_rc)[:, n_R:],
                                                                               wn_c, n_sel)),
        ("pop::decode_seq kernels=torch", dense_bytes, dense_bytes, lambda i: (rn(d, f),),
         lambda w: ops.decode_seq(h_full, w, None, wd_norm, rc_idx, n_R, n_sel, 0, 0)),
        ("pop::decode_seq kernels=triton", dense_bytes, dense_bytes, lambda i: (rn(d, f),),
         lambda w: ops.decode_seq(h_full, w, None, wd_norm, rc_idx, n_R, n_sel, 0, 1) if DEVICE == "cuda"
         else gemv_triton(masked_seq(h_full, wd_norm, rc_idx, n_R, n_sel), w)),
        ("dense gate+up F.linear", 2 * dense_bytes, 2 * dense_bytes, lambda i: (rn(2 * f, d),),
         lambda w: F.linear(x, w)),
        ("ideal gate+up F.linear n_keep", 2 * keep_bytes, 2 * keep_bytes, lambda i: (rn(2 * n_keep, d),),
         lambda w: F.linear(x, w)),
        ("pop gate+up F.linear (R ∪ C layout)", 2 * d * n_rc * e, 2 * d * n_rc * e, lambda i: (rn(2 * n_rc, d),),
         lambda w: F.linear(x, w)),
        ("pop::proxy_select int8", 2 * f * d, 2 * n_C * d,
         lambda i: (torch.randint(-127, 128, (2 * f, d), generator=g, device=dev, dtype=torch.int8),
                    torch.rand(2 * f, generator=g, device=dev) * 0.01),
         lambda q, s: ops.proxy_select(x, q, s, rc_idx[:1], wn_c, n_R, n_sel, f, 0)),
        ("rows_gemv_triton int8 (C band)", 2 * f * d, 2 * n_C * d,
         lambda i: (torch.randint(-127, 128, (2 * f, d), generator=g, device=dev, dtype=torch.int8),
                    torch.rand(2 * f, generator=g, device=dev) * 0.01),
         lambda q, s: rows_gemv_triton(x.reshape(B, d), q, rows_c, s, torch.float32)),
        ("proxy_scores_triton int8 (C band)", 2 * f * d, 2 * n_C * d, int8_set,
         lambda q, s: proxy_scores_triton(x.reshape(B, d), q, s, rc_idx[0, n_R:], wn_c, f, 0)),
        ("pop::proxy_select int3", 2 * f * 3 * d8, 2 * n_C * 3 * d8, int3_set,
         lambda q, s: ops.proxy_select(x, q, s, rc_idx[:1], wn_c, n_R, n_sel, f, 0)),
        # a wide band (γ = 0.6): the fused kernel against rows_gemv's gathered GEMV of the same rows
        ("pop::proxy_select int8 γ0.6", 2 * f * d, 2 * s6.n_C * d, int8_set,
         lambda q, s: ops.proxy_select(x, q, s, rc6, wn6, s6.n_R, s6.n_select, f, 0)),
        ("rows_gemv_triton int8 (C band γ0.6)", 2 * f * d, 2 * s6.n_C * d, int8_set,
         lambda q, s: rows_gemv_triton(x.reshape(B, d), q, rows6, s, torch.float32)),
        ("pop::proxy_select int3 γ0.6", 2 * f * 3 * d8, 2 * s6.n_C * 3 * d8, int3_set,
         lambda q, s: ops.proxy_select(x, q, s, rc6, wn6, s6.n_R, s6.n_select, f, 0)),
        ("pop::gather_in", 2 * d * n_rc * e, 2 * keep_bytes, lambda i: (rn(2 * n_rc, d),),
         lambda w: ops.gather_in(x, w, None, sel, n_R, n_rc, 2)),
        ("pop::decode_sel", d * n_pad * e, d * n_rc * e, lambda i: (rn(d, n_pad),),
         lambda w: ops.decode_sel(h_keep.reshape(B, 1, n_keep), w, None, sel, n_R, n_C)),
    ]
    results = {}
    for name, set_bytes, read_bytes, make_set, fn in items:
        if not budget_left("timing", 3, name=name, **base):
            continue
        r = guarded("timing", time_rotating, make_set, fn, set_bytes, read_bytes, name=name, **base)
        if r is not None:
            results[name] = r
            dense = results.get("dense_down F.linear")
            ideal = results.get("ideal_down F.linear n_keep")
            best = r.get("graph_us") or r["eager_us"]
            rel = {}
            if name in DOWN_ITEMS:  # the down projections, against dense cuBLAS and the contiguous n_keep GEMV
                for ref_name, ref in (("dense", dense), ("ideal", ideal)):
                    if ref is not None:
                        rel[f"speedup_vs_{ref_name}_down"] = (ref.get("graph_us") or ref["eager_us"]) / best
                # useful bytes: the n_keep columns a step needs, whatever the kernel streams to get them
                rel["useful_gbps"] = keep_bytes / (best / 1e6) / 1e9
                if CEIL_GBPS:
                    rel["useful_frac_of_ceiling"] = rel["useful_gbps"] / CEIL_GBPS
            if name in ("pop::decode kernels=triton", "gemv_triton (R ∪ C layout)") and B == 1:
                rel["target_frac_of_ceiling"] = 0.7 if shape_name == "7b" else 0.5  # the targets
                if "frac_of_ceiling" in r:
                    rel["target_met"] = r["frac_of_ceiling"] >= rel["target_frac_of_ceiling"]
            LOG.write("timing", name=name, read_bytes=read_bytes, **base, **r, **rel)


DOWN_ITEMS = ("ideal_down F.linear n_keep", "pop::decode kernels=torch", "pop::decode kernels=triton",
              "gemv_triton (R ∪ C layout)", "F.linear (R ∪ C layout)", "pop::decode_seq kernels=torch",
              "pop::decode_seq kernels=triton", "pop::decode_sel")


def section_timing():
    for name, (d, f) in SHAPES.items():
        for B in BATCHES:
            guarded("timing", time_shape, name, d, f, B, name="shape", shape=name, batch=B)




# ------------------------------------------------------------------------------------------------
# the FFN stack: dense vs POP (torch kernels, Triton kernels, autotuned) per cell, checked and timed
# ------------------------------------------------------------------------------------------------

_STACK_TIMES = {}  # (cuda graphs, batch) -> {variant: seconds per decode step}
_PROFILE_MODELS = {}  # variant -> (model, x_pre, x_dec): the graphs batch-1 cell's, for the profile section


class MutationWarnings(logging.Handler):
    """Counts Inductor's "assuming every input is mutated" warnings (a wrapped kernel it could not analyse: it then
    clones every input of the kernel on every call; torch 2.11 lacks the analysis the sm_90 test runs)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count, self.samples = 0, []

    def emit(self, record):
        msg = record.getMessage()
        if MUTATED_WARNING in msg:
            self.count += 1
            self.samples.append(msg[:300])

    def __enter__(self):
        logging.getLogger("torch").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("torch").removeHandler(self)


def pop_config(variant, lowering="inductor"):
    """The PopConfig of a POP variant (None: the variant is not available yet)."""
    from pop_fx.config import PopConfig

    if variant == "autotuned":
        if AUTOTUNED is None:
            return None
        return PopConfig(sparsity=R, candidate_ratio=GAMMA, lowering=lowering, **AUTOTUNED)
    return PopConfig(sparsity=R, candidate_ratio=GAMMA, lowering=lowering,
                     kernels="triton" if variant == "pop-triton" else "torch")


def build(variant, model, mode):
    """A compiled copy of ``model`` over the same Parameters: dense Inductor or POP with the variant's kernels."""
    from pop_fx.tools.model_copies import structural_copy

    torch._dynamo.reset()
    m = structural_copy(model)
    if variant == "dense":
        m.compile(backend="inductor", mode=mode)
        return m
    return pop_fx.compile(m, pop_config(variant), mode=mode)


def eager_reference(model, variant, run):
    """What ``run(m)`` returns on the uncompiled model (dense) or on the same POP graph run eagerly (torch ops)."""
    from pop_fx.tools.model_copies import structural_copy

    torch._dynamo.reset()
    m = structural_copy(model)
    if variant != "dense":
        pop_fx.compile(m, pop_config("pop-torch", lowering="eager"))
    with torch.no_grad():
        out = run(m)
    if variant != "dense":
        from pop_fx.tools.bench import require_fully_rewritten

        require_fully_rewritten("pop eager reference", m)
    torch._dynamo.reset()
    return out


def _call(m, x, graphs):
    if graphs and DEVICE == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    return m(x)


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def stack_cell(model, graphs, B):
    from torch._dynamo.utils import counters

    from pop_fx.tools.bench import require_fully_rewritten

    d, f = STACK_SHAPE
    L = STACK_LAYERS
    mode = "reduce-overhead" if graphs else None
    g = _gen(5 + B)
    x_pre = torch.randn(B, 16, d, generator=g, device=DEVICE).to(DTYPE)
    x_dec = torch.randn(B, 1, d, generator=g, device=DEVICE).to(DTYPE)
    sizes = P.partition_sizes(f, R, GAMMA)
    n_rc = sizes.n_R + sizes.n_C
    pop_bytes = L * 3 * d * n_rc * DTYPE.itemsize
    bytes_step = {"dense": L * 3 * d * f * DTYPE.itemsize}
    ideal_bytes = L * 3 * d * sizes.n_keep * DTYPE.itemsize
    times = _STACK_TIMES.setdefault((graphs, B), {})
    refs = {}

    def decode_after_prefill(m):
        _call(m, x_pre, graphs)
        return _call(m, x_dec, graphs).clone()

    for v in VARIANTS:
        cell = dict(variant=v, batch=B, cuda_graphs=graphs, layers=L, shape=[d, f])
        if v != "dense" and pop_config(v) is None:
            LOG.write("stack", "skipped", reason="AUTOTUNED is None", **cell)
            continue
        if not budget_left("stack", 35, **cell):
            continue

        def one(v=v):
            ref_key = "dense" if v == "dense" else "pop"
            if ref_key not in refs:
                refs[ref_key] = eager_reference(model, v, decode_after_prefill)
            c0 = {k: counters["inductor"][k] for k in ("cudagraph_skips", "cudagraph_recorded_non_static_inputs")}
            t_build = time.perf_counter()
            with MutationWarnings() as warned, torch.no_grad():
                m = build(v, model, mode)
                for _ in range(2):  # compile and warm: prefill then decode graphs (cudagraph trees record here)
                    _call(m, x_pre, graphs)
                    for _ in range(3):
                        _call(m, x_dec, graphs)
                sync()
            compile_s = time.perf_counter() - t_build
            if v != "dense":
                require_fully_rewritten(v, m)
            with torch.no_grad():
                got = decode_after_prefill(m)
                rel = _rel(got, refs[ref_key])
                steps, rounds = (2, 2) if TINY else (20, 5)
                samples = []
                for _ in range(rounds):
                    _call(m, x_pre, graphs)  # each round re-partitions, as a new prompt would
                    samples.append(time_region(lambda: _call(m, x_dec, graphs), steps))
            step = statistics.median(samples)
            tol = STACK_TOL_AUTOTUNED if v == "autotuned" else STACK_TOL
            times[v] = step
            nbytes = bytes_step.get(v, pop_bytes)
            if v == "autotuned":  # what Inductor's autotuner chose for this cell, with the times it saw
                from pop_fx import autotune

                cell["choices"] = [d.as_dict() for d in autotune.decisions() if not d.how.endswith("pinned")]
            rec = dict(**cell, step_ms=step * 1e3, per_layer_ms=step * 1e3 / L, samples_ms=[s * 1e3 for s in samples],
                       compile_s=compile_s, read_bytes=nbytes, gbps=nbytes / step / 1e9, ideal_bytes=ideal_bytes,
                       rel_err_vs_eager=rel, tol=tol, mutated_input_warnings=warned.count,
                       mutated_input_samples=warned.samples[:3],
                       ideal_floor_ms=(ideal_bytes / (CEIL_GBPS * 1e9) * 1e3) if CEIL_GBPS else None,
                       **{"pass": rel <= tol})
            if CEIL_GBPS:
                rec["frac_of_ceiling"] = rec["gbps"] / CEIL_GBPS
            if graphs:  # a skipped cudagraph, or weights/state copied on every replay, shows here
                rec.update({k: counters["inductor"][k] - n for k, n in c0.items()})
            if "dense" in times and v != "dense":
                rec["speedup_vs_dense"] = times["dense"] / step
                rec["target_speedup"] = 1.5 if B == 1 else 1.2
                rec["target_met"] = rec["speedup_vs_dense"] >= rec["target_speedup"]
            LOG.write("stack", **rec)
            if B == 1 and v not in _PROFILE_MODELS:  # the first batch-1 cell's: under CUDA graphs on a GPU
                _PROFILE_MODELS[v] = (m, x_pre, x_dec, graphs)

        guarded("stack", one, **cell)
    torch._dynamo.reset()


def section_stack(cells=None):
    from pop_fx.tools.bench import FFNStack

    d, f = STACK_SHAPE
    model = FFNStack(d, f, STACK_LAYERS, DTYPE).to(DEVICE).eval()
    # Static shapes for every variant: the prefill's sequence length must not make the decode graph dynamic
    # (Dynamo's automatic dynamic shapes would, on the second shape it sees), the fastest dense baseline.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for graphs, B in cells or STACK_CELLS[:2]:
            guarded("stack", stack_cell, model, graphs, B, batch=B, cuda_graphs=graphs)
    for B in BATCHES:  # CUDA graphs should be no slower than without
        for v in VARIANTS:
            a, b = _STACK_TIMES.get((False, B), {}).get(v), _STACK_TIMES.get((True, B), {}).get(v)
            if a and b:
                LOG.write("stack", name="cuda_graphs_vs_eager", variant=v, batch=B, ratio=a / b,
                          target_met=b <= a * 1.02)


def section_stack_eager():
    section_stack(STACK_CELLS[2:])


# ------------------------------------------------------------------------------------------------
# kernel-only times of one decode step, from one profiler pass over a CUDA-graph replay
# ------------------------------------------------------------------------------------------------


def kernel_kind(name: str) -> str:
    """gemv (cuBLAS / CUTLASS / Triton GEMV and GEMM kernels), select (top-k, sort, the select kernel), small."""
    n = name.lower()
    if any(s in n for s in ("select", "topk", "sort", "radix")):
        return "select"
    if any(s in n for s in ("gemv", "gemm", "xmma", "cutlass", "matmul", "_mm_", "sm90_", "splitk", "pair_gemv",
                            "rows_gemv", "addmm", "aten::mm", "aten::linear", "aten::bmm")):
        return "gemv"
    return "small"


def profile_step(m, x_pre, x_dec, graphs):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.no_grad():
        _call(m, x_pre, graphs)
        _call(m, x_dec, graphs)
        sync()
        with profile(activities=acts) as prof:
            _call(m, x_dec, graphs)
            sync()
    per = {}
    for ev in prof.events():
        if DEVICE == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        else:  # CPU: the ops compiled code calls (Inductor's own C++ kernels are not profiled)
            parent = ev.cpu_parent.name if ev.cpu_parent is not None else ""
            if not ev.name.startswith(("aten::", "pop::")) or parent.startswith(("aten::", "pop::")):
                continue
            us = ev.cpu_time
        c, t = per.get(ev.name, (0, 0.0))
        per[ev.name] = (c + 1, t + us)
    kinds = {}
    for name, (c, t) in per.items():
        k = kinds.setdefault(kernel_kind(name), dict(count=0, us=0.0))
        k["count"] += c
        k["us"] += t
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:16]
    return dict(unit="cuda kernels (device time, one graph replay)" if DEVICE == "cuda" else "cpu ops (cpu time)",
                total=sum(c for c, _ in per.values()), total_us=sum(t for _, t in per.values()), kinds=kinds,
                top=[dict(name=n[:120], count=c, us=t) for n, (c, t) in top])


def section_profile():
    if not _PROFILE_MODELS:
        LOG.write("profile", "skipped", reason="no batch-1 stack model was built (stack failed or was skipped)")
        return
    for v, (m, x_pre, x_dec, graphs) in list(_PROFILE_MODELS.items()):
        if not budget_left("profile", 5, variant=v):
            continue
        p = guarded("profile", profile_step, m, x_pre, x_dec, graphs, variant=v)
        if p is not None:
            LOG.write("profile", variant=v, layers=STACK_LAYERS, cuda_graphs=graphs,
                      per_layer=p["total"] / STACK_LAYERS, **p)
    _PROFILE_MODELS.clear()


# ------------------------------------------------------------------------------------------------
# registers and spills as compiled on the device
# ------------------------------------------------------------------------------------------------


def section_registers():
    """Each Triton kernel this process launched eagerly (the correctness and timing items), per specialization:
    registers, spills, shared memory, warps. (Inside compiled graphs Inductor compiles its own copy of the same
    kernel source with the same constants.)"""
    if TINY:
        LOG.write("registers", "skipped", reason="the interpreter compiles nothing")
        return
    from pop_fx.ops import experts_decode as X, proxy_kernels as PK, rows_gemv as RG, splitk_gemv as S

    kernels = dict(gemv=S._gemv_kernel, gemv_finish=S._gemv_finish_kernel, select=S._select_kernel,
                   rows_gemv=RG._rows_gemv_kernel, pair_gemv=X._pair_gemv_kernel,
                   proxy_int8=PK._proxy_int8_kernel, proxy_int3=PK._proxy_int3_kernel,
                   proxy_finish=PK._proxy_finish_kernel)
    found = 0
    for name, fn in kernels.items():
        for dev, entry in dict(getattr(fn, "device_caches", {}) or {}).items():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, k in dict(cache).items():
                if hasattr(k, "_init_handles"):
                    k._init_handles()
                md = getattr(k, "metadata", None)
                LOG.write("registers", kernel=name, n_regs=getattr(k, "n_regs", None),
                          n_spills=getattr(k, "n_spills", None), num_warps=getattr(md, "num_warps", None),
                          num_stages=getattr(md, "num_stages", None), shared=getattr(md, "shared", None),
                          key=str(key)[:400])
                found += 1
    if not found:
        LOG.write("registers", "skipped", reason="no Triton kernel was launched eagerly in this process")


# ------------------------------------------------------------------------------------------------
# MoE and a 7B-shaped Llama, end to end
# ------------------------------------------------------------------------------------------------


def section_moe():
    """OLMoE-like experts stack: decode step (batch 1) and a prefill (POP's partition + layout copies: TTFT)."""
    from pop_fx.tools.bench import require_fully_rewritten
    from pop_fx.tools.bench_moe import MoEStack, _fill, _with_impl, moe_config

    cfg = moe_config(MOE_SHAPE, MOE_LAYERS)
    model = _fill(MoEStack(cfg), DTYPE).to(DEVICE)
    d = cfg.hidden_size
    prompt = 16 if TINY else 512
    g = _gen(21)
    x_pre = torch.randn(1, prompt, d, generator=g, device=DEVICE).to(DTYPE)
    x_dec = torch.randn(1, 1, d, generator=g, device=DEVICE).to(DTYPE)
    base = dict(shape=MOE_SHAPE, layers=MOE_LAYERS, experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                d=d, d_ff=cfg.moe_intermediate_size, prompt=prompt)
    times = {}
    ref = {}
    for v in ("dense", "pop-torch", "pop-triton"):
        if not budget_left("moe", 45, variant=v, **base):
            continue

        def one(v=v):
            torch._dynamo.reset()
            with torch.no_grad():
                if v not in ref and "pop" in v and "pop" not in ref:
                    # (the experts' default "eager" implementation graph-breaks on routing: POP needs grouped_mm)
                    r = _with_impl(model, "grouped_mm")
                    pop_fx.compile(r, pop_config("pop-torch", lowering="eager"))
                    r(x_pre)
                    ref["pop"] = r(x_dec).clone()
                    if torch.equal(ref["pop"], model(x_dec)):  # POP prunes: it cannot equal the dense output
                        raise RuntimeError("the eager POP reference of the MoE stack equals dense: not rewritten")
                    torch._dynamo.reset()
                if v == "dense":
                    ref["dense"] = model(x_dec).clone()
                    m = _with_impl(model, "grouped_mm")
                    m.compile(backend="inductor")
                else:
                    m = pop_fx.compile(_with_impl(model, "grouped_mm"), pop_config(v))
                t0 = time.perf_counter()
                for _ in range(2):
                    m(x_pre)
                    m(x_dec)
                sync()
                compile_s = time.perf_counter() - t0
                if v != "dense":
                    require_fully_rewritten(v, m)
                m(x_pre)
                rel = _rel(m(x_dec), ref["dense" if v == "dense" else "pop"])
                n = 2 if TINY else 5
                prefill = statistics.median(time_region(lambda: m(x_pre), 1) for _ in range(n))
                m(x_pre)
                step = statistics.median(time_region(lambda: m(x_dec), 2 if TINY else 10) for _ in range(n))
            times[v] = step
            rec = dict(variant=v, **base, compile_s=compile_s, prefill_ms=prefill * 1e3, step_ms=step * 1e3,
                       rel_err_vs_eager=rel, tol=STACK_TOL, **{"pass": rel <= STACK_TOL})
            if "dense" in times and v != "dense":
                rec["speedup_vs_dense"] = times["dense"] / step
            LOG.write("moe", **rec)

        guarded("moe", one, variant=v, **base)
    torch._dynamo.reset()


def section_llama7b():
    """A 7B-shaped Llama (2 layers, random weights): generate() TTFT and decode ms/token, dense vs POP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pop_fx.tools.model_copies import structural_copy

    cfg = LlamaConfig(**LLAMA, num_hidden_layers=LLAMA_LAYERS, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(DTYPE).eval()
    prompt, new = (8, 3) if TINY else (128, 17)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt), generator=_gen(9), device=DEVICE)
    gen = dict(do_sample=False, min_new_tokens=1, eos_token_id=None, pad_token_id=0)
    base = dict(layers=LLAMA_LAYERS, d=cfg.hidden_size, d_ff=cfg.intermediate_size, prompt=prompt, new_tokens=new)
    with torch.no_grad():
        eager_tokens = model.generate(ids, max_new_tokens=new, **gen)
    times = {}
    for v in ("dense", "pop-torch", "pop-triton"):
        if not budget_left("llama7b", 60, variant=v, **base):
            continue

        def one(v=v):
            torch._dynamo.reset()
            m = structural_copy(model)
            if v == "dense":
                m.compile(backend="inductor")
            else:
                pop_fx.compile(m, pop_config(v))
            with torch.no_grad():
                t0 = time.perf_counter()
                tokens = m.generate(ids, max_new_tokens=new, **gen)  # compiles prefill and decode graphs
                m.generate(ids, max_new_tokens=1, **gen)
                sync()
                compile_s = time.perf_counter() - t0
                if v != "dense":
                    from pop_fx.tools.bench import require_fully_rewritten

                    require_fully_rewritten(v, m)
                n = 2 if TINY else 3
                ttft = statistics.median(time_region(lambda: m.generate(ids, max_new_tokens=1, **gen), 1)
                                         for _ in range(n))
                full = statistics.median(time_region(lambda: m.generate(ids, max_new_tokens=new, **gen), 1)
                                         for _ in range(n))
            per_token = (full - ttft) / (new - 1)
            times[v] = per_token
            rec = dict(variant=v, **base, compile_s=compile_s, ttft_ms=ttft * 1e3, decode_ms_per_token=per_token * 1e3,
                       same_tokens_as_eager_dense=bool(torch.equal(tokens, eager_tokens)))
            if "dense" in times and v != "dense":
                rec["speedup_vs_dense"] = times["dense"] / per_token
            LOG.write("llama7b", **rec)

        guarded("llama7b", one, variant=v, **base)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# sections in a subprocess: correctness (a sticky CUDA error voids only it) and the suite's CUDA tests
# ------------------------------------------------------------------------------------------------


def section_correctness():
    if ARGS.child:
        correctness_here()
        return
    if not budget_left("correctness", 40):
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--sections", "correctness", "--out", OUT_DIR,
           "--budget", str(max(30.0, remaining()))] + (["--tiny"] if ARGS.tiny else [])
    LOG.f.flush()
    start = os.path.getsize(LOG.path)
    limit = max(60.0, remaining() + 30)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-3000:]
    with open(LOG.path) as fh:  # the child's records: count its errors and failed checks here too
        fh.seek(start)
        for line in fh:
            if line.strip():
                LOG.count(json.loads(line))
    if rc != 0:
        LOG.write("correctness", "error", error=f"the correctness subprocess ended with {rc}", tail=tail)


def section_cuda_tests():
    if TINY:
        LOG.write("cuda_tests", "skipped", reason="no CUDA (--tiny)")
        return
    try:
        import pytest  # noqa: F401
    except ImportError:
        LOG.write("cuda_tests", "skipped", reason="pytest is not installed")
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = []
    for dirpath, _, names in os.walk(os.path.join(root, "tests")):
        for n in names:
            if n.startswith("test_") and n.endswith(".py"):
                path = os.path.join(dirpath, n)
                with open(path) as fh:
                    if "cuda.is_available" in fh.read():
                        files.append(os.path.relpath(path, root))
    limit = min(120.0, remaining())
    if limit < 20:
        LOG.write("cuda_tests", "skipped", reason="budget", files=files)
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", *sorted(files)]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=limit,
                              env=dict(os.environ, PYTHONPATH=root))
    except subprocess.TimeoutExpired as exc:
        LOG.write("cuda_tests", "error", error=f"timed out after {limit:.0f} s", files=files,
                  tail=str(exc.stdout or "")[-3000:])
        return
    status = {0: "ok", 5: "skipped"}.get(proc.returncode, "error")  # 5: pytest collected nothing
    LOG.write("cuda_tests", status, files=files, returncode=proc.returncode,
              tail=(proc.stdout + proc.stderr)[-3000:])


# In the order they run: what decides the defaults first, the suite's CUDA tests and the drift check last.
SECTIONS = {"env": section_env, "ceiling": section_ceiling, "stack": section_stack, "profile": section_profile,
            "moe": section_moe, "llama7b": section_llama7b, "stack_eager": section_stack_eager,
            "correctness": section_correctness, "timing": section_timing, "registers": section_registers,
            "cuda_tests": section_cuda_tests, "drift": section_drift}


def main():
    wanted = ARGS.sections.split(",") if ARGS.sections else list(SECTIONS)
    for name in wanted:
        t = time.perf_counter()
        try:
            SECTIONS[name]()
        except Exception as exc:  # noqa: BLE001
            LOG.error(name, exc)
        print(f"# section {name}: {time.perf_counter() - t:.1f} s", flush=True)
    if ARGS.child:
        return 1 if LOG.errors else 0
    LOG.write("done", wall_s=time.perf_counter() - T0, errors=LOG.errors, sections=wanted,
              correctness_failed=LOG.failed, targets=LOG.targets)
    # an error record or a failed check fails the run (its records are all written above)
    return 1 if LOG.errors or LOG.failed else 0


if __name__ == "__main__":
    sys.exit(main())
