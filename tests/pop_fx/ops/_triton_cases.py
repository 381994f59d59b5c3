"""Run under TRITON_INTERPRET=1 (set before triton is imported): Triton kernels vs their torch references."""

import json
import sys

import torch

from pop_fx import partition as P
from pop_fx.lowbit import quantize_rows
from pop_fx.ops.decode import decode_down_triton
from pop_fx.ops.decode_seq import decode_seq_triton, keep_indices
from pop_fx.ops.layout import CONV1D
from pop_fx.ops.rows_gemv import rows_gemv_triton

out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for B, n_R, n_C, N, k in [(1, 45, 13, 131, 6), (3, 37, 19, 70, 7), (2, 0, 40, 33, 20), (1, 5, 1, 200, 1)]:
        g = torch.Generator().manual_seed(B * 1000 + N)
        h = torch.randn(B, n_R + n_C, generator=g).to(dtype)
        wd_t = torch.randn(n_R + n_C, N, generator=g).to(dtype)
        sel = torch.randperm(n_C, generator=g)[:k]
        got = decode_down_triton(h, wd_t, sel, n_R).double()
        keep = torch.cat([torch.arange(n_R), n_R + sel])
        ref = h.double()[:, keep] @ wd_t.double()[keep]
        out.append(dict(kernel="decode_down", dtype=str(dtype), shape=[B, n_R, n_C, N, k],
                        err=(got - ref).abs().max().item(), scale=ref.abs().max().item()))
    for conv1d in (False, True):
        B, f, N, n_R, k = 3, 53, 29, 20, 9
        g = torch.Generator().manual_seed(7)
        h = torch.randn(B, f, generator=g).to(dtype)
        wd = torch.randn((f, N) if conv1d else (N, f), generator=g).to(dtype)
        wd_norm = P.down_column_norm(wd, 0 if conv1d else -1)
        rc = torch.stack([torch.randperm(f, generator=g)[:40] for _ in range(4)])
        keep = keep_indices(h, wd_norm, rc, n_R, k)
        got = decode_seq_triton(h, wd, keep, CONV1D if conv1d else 0).double()
        cols = wd.double() if conv1d else wd.double().t()
        ref = torch.stack([h.double()[b, keep[b]] @ cols[keep[b]] for b in range(B)])
        out.append(dict(kernel="decode_seq", dtype=str(dtype), shape=[B, f, N, n_R, k, conv1d],
                        err=(got - ref).abs().max().item(), scale=ref.abs().max().item()))
    for B, n, K, k in [(1, 70, 37, 13), (3, 50, 130, 50), (2, 9, 200, 1)]:
        g = torch.Generator().manual_seed(n * 10 + K)
        x = torch.randn(B, K, generator=g).to(dtype)
        w = torch.randn(n, K, generator=g).to(dtype)
        rows = torch.randperm(n, generator=g)[:k]
        got = rows_gemv_triton(x, w, rows).double()  # the exact gathered gate/up rows
        ref = x.double() @ w.double()[rows].t()
        out.append(dict(kernel="rows_gemv", dtype=str(dtype), shape=[B, n, K, k],
                        err=(got - ref).abs().max().item(), scale=ref.abs().max().item()))
        q, s = quantize_rows(w)
        got = rows_gemv_triton(x, q, rows, s, torch.float32).double()  # the int8 proxy rows
        ref = x.double() @ (q.double() * s.double()[:, None])[rows].t()
        out.append(dict(kernel="rows_gemv_int8", dtype=str(dtype), shape=[B, n, K, k],
                        err=(got - ref).abs().max().item(), scale=ref.abs().max().item()))
json.dump(out, sys.stdout)
