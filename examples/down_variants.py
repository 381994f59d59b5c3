"""Why POP's CPU down projection reads all of C, masked: three ways to project R + the selected candidates.

    python examples/down_variants.py [float32|bfloat16]

1B shape at r=0.5, γ=0.1 (d 2048, n_R 2534, n_C 563, 282 selected), batch 1, 2 threads, 16 weight sets cycled so
none stays in cache; µs per call, the mean of 200 calls, two passes:

* ``masked``    — one GEMV over the [d, n_R + n_C] layout (nn.Linear's), unselected candidates zeroed (POP's path);
* ``ebag``      — GEMV over R only + ``embedding_bag`` of the selected rows of a channel-major copy of C;
* ``gather_mm`` — GEMV over R only + the selected rows gathered (``index_select``), then a GEMM;
* ``R_only``    — the GEMV over R alone: the floor of any variant that reads R.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dt = getattr(torch, argv[0]) if argv else torch.float32
    torch.set_num_threads(2)
    d, n_R, n_C, k, L = 2048, 2534, 563, 282, 16
    g = torch.Generator().manual_seed(0)
    wd_rc = [torch.randn(d, 3104, generator=g).to(dt) for _ in range(L)]
    wd_R = [w[:, :n_R].contiguous() for w in wd_rc]
    wc_t = [w[:, n_R:n_R + n_C].t().contiguous() for w in wd_rc]
    h = torch.randn(1, n_R + n_C, generator=g).to(dt)
    sels = [torch.randperm(n_C, generator=g)[:k] for _ in range(L)]
    zero = torch.zeros(1, dtype=torch.long)

    def masked(i):
        hm = h.clone()
        hm[:, n_R:] = 0
        hm[:, n_R + sels[i]] = h[:, n_R + sels[i]]
        return torch.mm(hm, wd_rc[i][:, : n_R + n_C].t())

    def ebag(i):
        s = sels[i]
        y = torch.mm(h[:, :n_R], wd_R[i].t())
        return y + F.embedding_bag(s, wc_t[i], zero, mode="sum", per_sample_weights=h[0, n_R + s])

    def gather_mm(i):
        s = sels[i]
        return torch.mm(h[:, :n_R], wd_R[i].t()) + torch.mm(h[:, n_R + s], wc_t[i].index_select(0, s))

    def r_only(i):
        return torch.mm(h[:, :n_R], wd_R[i].t())

    def timed(fn, n=200):
        for i in range(20):
            fn(i % L)
        t0 = time.perf_counter()
        for i in range(n):
            fn(i % L)
        return (time.perf_counter() - t0) / n * 1e6

    with torch.no_grad():
        for _ in range(2):
            print({name: round(timed(fn), 1) for name, fn in
                   dict(masked=masked, ebag=ebag, gather_mm=gather_mm, R_only=r_only).items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
