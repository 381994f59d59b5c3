"""Run under TRITON_INTERPRET=1 (set before triton is imported): Triton kernels vs their torch references."""

import json
import sys

import torch

from pop_fx import partition as P
from pop_fx.lowbit import pack_int3, quantize_rows, quantize_rows_int3
from pop_fx.ops.decode import decode_reference, decode_triton
from pop_fx.ops.experts_decode import pair_gemv_reference, pair_gemv_triton
from pop_fx.ops.proxy_kernels import proxy_scores_triton
from pop_fx.ops.proxy_select import proxy_activation, proxy_select_triton
from pop_fx.ops.rows_gemv import rows_gemv_triton
from pop_fx.ops.splitk_gemv import SELECT_MAX, gemv_triton, select_fits, select_triton

out = []


class Grids:
    """A ``launch`` wrapper that records each kernel's name and grid (the ops pass ``torch.library.wrap_triton``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Launch:
            def __getitem__(self, grid):
                rec.calls.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, tuple(grid)))
                return kernel[grid]

        return _Launch()


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a call runs (outside the kernels, which the interpreter runs on numpy)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def record(kernel, dtype, shape, got, ref, **extra):
    got, ref = got.double(), ref.double()
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    out.append(dict(kernel=kernel, dtype=str(dtype), shape=shape, err=err, scale=ref.abs().max().item() if ref.numel()
                    else 0.0, nan=bool(torch.isnan(got).any()), **extra))


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    # split-K GEMV: odd N and K, batches 1..16, K smaller than one tile and spanning several splits
    for B, N, K in [(1, 131, 45), (3, 70, 300), (16, 33, 129), (2, 200, 1000), (1, 1, 7)]:
        g = torch.Generator().manual_seed(B * 1000 + N + K)
        x = torch.randn(B, K, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(dtype)
        record("gemv", dtype, [B, N, K], gemv_triton(x, w), x.double() @ w.double().t())
    # the fused form: x narrower than the (padded) weight, a candidate mask over columns n_R.., a bias
    for B, N, Kx, K, n_R in [(1, 70, 45, 48, 20), (3, 33, 300, 304, 0), (16, 131, 129, 144, 100), (2, 9, 1000, 1008, 999)]:
        g = torch.Generator().manual_seed(B * 3 + N + K)
        x = torch.randn(B, Kx, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(dtype)
        m = (torch.rand(Kx - n_R, generator=g) < 0.5).float()
        bias = torch.randn(N, generator=g).to(dtype)
        xm = torch.cat([x.double()[:, :n_R], x.double()[:, n_R:] * m.double()], -1)
        record("gemv_masked", dtype, [B, N, Kx, K, n_R], gemv_triton(x, w, mask=m, n_R=n_R, bias=bias),
               xm @ w.double()[:, :Kx].t() + bias.double())
    # select: exactly the top-k set of partition.select, ties (integer activations) and NaN included
    for B, n_R, n_C, k, ties in [(1, 5, 13, 6, False), (3, 0, 40, 20, True), (2, 7, 100, 1, True), (1, 2, 9, 8, False)]:
        g = torch.Generator().manual_seed(n_C * 7 + k)
        h = (torch.randint(-2, 3, (B, n_R + n_C), generator=g).float() if ties else torch.randn(B, n_R + n_C, generator=g))
        if ties:
            h[0, n_R + 3] = float("nan")
        h = h.to(dtype)
        wn = torch.ones(n_C) if ties else torch.rand(n_C, generator=g) + 0.1
        got = select_triton(h, wn, n_R, k)
        want_sel = P.select(h[:, n_R:], wn, k)
        want = torch.cat([h[:, :n_R], h[:, n_R:] * torch.zeros(n_C, dtype=h.dtype).index_fill_(0, want_sel, 1)], -1)
        same_set = torch.equal(torch.nan_to_num(got.double(), 9.0), torch.nan_to_num(want.double(), 9.0))
        out.append(dict(kernel="select", dtype=str(dtype), shape=[B, n_R, n_C, k], err=0.0 if same_set else 1e9,
                        scale=0.0, nan=False))
    # the decode op's Triton path end to end, against its torch path
    for B, n_R, n_C, N, k in [(1, 45, 13, 131, 6), (3, 37, 19, 70, 7), (2, 0, 40, 33, 20), (1, 5, 2, 200, 1)]:
        g = torch.Generator().manual_seed(B * 77 + N)
        h = torch.randn(B, 1, n_R + n_C, generator=g).to(dtype)
        wd_rc = torch.randn(N, n_R + n_C, generator=g).to(dtype)
        wn = torch.rand(n_C, generator=g) + 0.1
        record("decode", dtype, [B, n_R, n_C, N, k], decode_triton(h, wd_rc, None, wn, n_R, k),
               decode_reference(h.double(), wd_rc.double(), None, wn, n_R, k))
    # rows GEMV at batch 1, 3 and 8 (one program reads its rows once for the whole batch: the grid has one batch
    # block up to 16 rows, two at 17) and 17
    for B, n, K, k in [(1, 70, 37, 13), (3, 50, 130, 50), (8, 9, 200, 1), (8, 100, 64, 70), (17, 40, 48, 33)]:
        g = torch.Generator().manual_seed(n * 10 + K)
        x = torch.randn(B, K, generator=g).to(dtype)
        w = torch.randn(n, K, generator=g).to(dtype)
        rows = torch.randperm(n, generator=g)[:k]
        grids = Grids()
        record("rows_gemv", dtype, [B, n, K, k], rows_gemv_triton(x, w, rows, launch=grids),
               x.double() @ w.double()[rows].t(), grids=grids.calls)
        q, s = quantize_rows(w)
        record("rows_gemv_int8", dtype, [B, n, K, k], rows_gemv_triton(x, q, rows, s, torch.float32),
               x.double() @ (q.double() * s.double()[:, None])[rows].t())
    # pair GEMV with the grouped paths' offsets: pairs past offs[-1] (the dense-expert pass's non-dense pairs) are
    # neither computed nor written (a poisoned output keeps its NaN there)
    for P_, E, N, K, live in [(5, 3, 70, 45, 3), (8, 4, 37, 130, 8), (6, 2, 9, 7, 0)]:
        g = torch.Generator().manual_seed(P_ * 7 + K)
        x = torch.randn(P_, K, generator=g).to(dtype)
        w = torch.randn(E, N, K, generator=g).to(dtype)
        e = torch.randint(0, E, (P_,), generator=g).sort().values
        offs = torch.full((E,), live, dtype=torch.int32)
        y = torch.full((P_, N), float("nan"), dtype=dtype)
        pair_gemv_triton(x, w, e, offs, out=y)
        ref = pair_gemv_reference(x.double(), w.double(), e)
        record("pair_gemv_offs", dtype, [P_, E, N, K, live], y[:live], ref[:live],
               skipped_untouched=bool(torch.isnan(y[live:]).all()))
    # the fused proxy-scoring kernel (int8 rows and int3 bit planes) against proxy_activation + candidate_scores in
    # float64 from the same inputs, and its selection against candidate_topk's. Shapes: K below one tile (one launch)
    # and spanning several (split-K + the finishing kernel), K not a multiple of the tile, n_C odd, gate-only,
    # batches 1, 3 and 17 (two batch blocks); every activation code.
    for fmt in ("int8", "int3"):
        for B, d, d_ff, n_C, both, act in [(1, 45, 40, 13, True, 0), (3, 300, 50, 17, True, 1),
                                           (1, 600, 64, 31, False, 2), (17, 100, 40, 9, True, 3),
                                           (3, 1100, 30, 7, True, 0)]:
            g = torch.Generator().manual_seed(B * 100 + d)
            w = torch.randn(2 * d_ff if both else d_ff, d, generator=g)
            q, s = (quantize_rows_int3 if fmt == "int3" else quantize_rows)(w)
            x = torch.randn(B, d, generator=g).to(dtype)
            c = torch.randperm(d_ff, generator=g)[:n_C]
            wn = torch.rand(n_C, generator=g) + 0.1
            h64 = proxy_activation(x.double(), q, s.double(), c, d_ff, act, both)
            scores = proxy_scores_triton(x, q, s, c, wn, d_ff, act)
            record(f"proxy_{fmt}", dtype, [B, d, d_ff, n_C, both, act], scores, P.candidate_scores(h64, wn.double()))
            if B == 3:  # keys on the one-launch, the gate-only split and the two-batch-block cases
                continue
            # the keys the op selects from: partition.rank_keys of those very scores, written by the kernel
            same = torch.equal(proxy_scores_triton(x, q, s, c, wn, d_ff, act, keys=True), P.rank_keys(scores))
            out.append(dict(kernel=f"proxy_select_{fmt}", dtype=str(dtype), shape=[B, d, d_ff, n_C, both, act],
                            err=0.0 if same else 1e9, scale=0.0, nan=False))
        # ties: integer x and proxy values with unit scales, ReLU and unit norms make every score exact, with many
        # equal ones: the set must be exactly candidate_topk's (ties by the lower position in C)
        for B, d, d_ff, n_C, k in [(2, 70, 50, 40, 20), (1, 33, 21, 21, 5), (3, 260, 40, 33, 16)]:
            g = torch.Generator().manual_seed(n_C * 3 + k)
            vals = torch.randint(-3, 4, (2 * d_ff, d), generator=g, dtype=torch.int8)
            q = pack_int3(vals) if fmt == "int3" else vals
            s = torch.ones(2 * d_ff)
            x = torch.randint(-1, 2, (B, d), generator=g).to(dtype)
            c = torch.randperm(d_ff, generator=g)[:n_C]
            wn = torch.ones(n_C)
            want = P.candidate_topk(proxy_activation(x, q, s, c, d_ff, 3, True), wn, k).sort().values
            got = proxy_select_triton(x, q, s, c, wn, k, d_ff, 3).sort().values
            out.append(dict(kernel=f"proxy_select_{fmt}", dtype=str(dtype), shape=[B, d, d_ff, n_C, k],
                            err=0.0 if torch.equal(got, want) else 1e9, scale=0.0, nan=False))
# pop::decode's Triton path as three launches (select, GEMV, finish) and no torch op between them: the mask is
# applied as the GEMV loads h, the split sum, bias and cast are the finishing kernel's (was: mul, cat, pad, sum, to)
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 1, 61, generator=g).to(dtype)
    wd_rc = torch.randn(40, 64, generator=g).to(dtype)
    wn, bd = torch.rand(41, generator=g) + 0.1, torch.randn(40, generator=g).to(dtype)
    grids, ops = Grids(), AtenOps()
    with ops:
        y = decode_triton(h, wd_rc, bd, wn, 20, 9, launch=grids)
    record("decode_launches", dtype, [3, 20, 41, 40, 9], y, decode_reference(h.double(), wd_rc.double(), bd.double(),
                                                                           wn, 20, 9),
           kernels=[name for name, _ in grids.calls], aten=sorted(set(ops.ops)))
# a 7B model's down projection at γ 0.6 (n_C 8602 > SELECT_MAX: torch.topk ranks, the fused GEMV projects): only
# the band's width matters here, so d_model is small and odd
sizes = P.partition_sizes(14336, 0.5, 0.6)
assert not select_fits(sizes.n_C) and sizes.n_C > SELECT_MAX
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(7)
    n_rc = sizes.n_R + sizes.n_C
    h = torch.randn(2, 1, n_rc, generator=g).to(dtype)
    wd_rc = torch.randn(37, n_rc + (-n_rc) % 16, generator=g).to(dtype)
    wn = torch.rand(sizes.n_C, generator=g) + 0.1
    record("decode_wide_band", dtype, [2, sizes.n_R, sizes.n_C, 37, sizes.n_select],
           decode_triton(h, wd_rc, None, wn, sizes.n_R, sizes.n_select),
           decode_reference(h.double(), wd_rc.double(), None, wn, sizes.n_R, sizes.n_select))
json.dump(out, sys.stdout)
