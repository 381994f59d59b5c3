"""The two CPU choices behind POP's layout copy and its batch-1 expert GEMVs, timed side by side.

    python examples/copy_gemv_variants.py

2 threads, medians of 9 calls (copies) / 15 calls (GEMVs), ms per call, fp32 and bf16:

* column copy (``pop_fx.ops.layout.gather_columns``): 3099 of 5632 columns of a 1B down projection [2048, 5632],
  and 563 of 1024 columns of 64 OLMoE experts' down [64, 2048, 1024] — ``index_select`` along the last dim /
  ``gather`` with the index expanded / the same gather over the bits as integers (POP's);
* expert-row copy (``gather_rows``): 2·563 rows of each of 64 experts' gate_up [64, 2048, 2048] — ``gather`` with the
  index expanded over the columns / one ``index_select`` over the flattened rows (POP's);
* pair GEMV at batch 1 (``pop_fx.ops.experts_decode.pairs_gemv``): 8 pairs, each its own expert of [64, 2048, 2048]
  (OLMoE gate/up) — ``torch._grouped_mm`` / ``bmm(w[ids], x)`` compiled by Inductor (POP's, one generated kernel that
  reads each block in place).
"""

from __future__ import annotations

import statistics
import time

import torch

from pop_fx.ops.layout import gather_columns, gather_rows


def _ms(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> int:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).removeprefix("torch.")
        wd = torch.randn(2048, 5632, generator=g).to(dt)
        rc = torch.randperm(5632, generator=g)[:3099].sort().values
        out = torch.empty(2048, 3104, dtype=dt)[:, :3099]
        a = _ms(lambda: torch.index_select(wd, 1, rc, out=out), 9)
        b = _ms(lambda: out.copy_(torch.gather(wd, 1, rc[None].expand(2048, 3099))), 9)
        c = _ms(lambda: gather_columns(wd, rc, out), 9)
        print(f"{name:9s} 1B down columns:    index_select {a:7.1f}  gather {b:7.1f}  gather of bits {c:7.1f} ms")
        del wd, out
        E, I, H, n = 64, 1024, 2048, 563
        down = torch.randn(E, H, I, generator=g).to(dt)
        rce = torch.stack([torch.randperm(I, generator=g)[:n].sort().values for _ in range(E)])
        out = torch.empty(E, H, 576, dtype=dt)[:, :, :n]
        b = _ms(lambda: out.copy_(torch.gather(down, 2, rce[:, None, :].expand(E, H, n))), 3)
        c = _ms(lambda: gather_columns(down, rce, out), 3)
        print(f"{name:9s} experts' down cols:                    gather {b:7.1f}  gather of bits {c:7.1f} ms")
        del down, out
        gate_up = torch.randn(E, 2 * I, H, generator=g).to(dt)
        rows = torch.cat([rce, rce + I], dim=-1)
        w_in = torch.empty(E, 2 * n, H, dtype=dt)
        b = _ms(lambda: w_in.copy_(torch.gather(gate_up, 1, rows[:, :, None].expand(E, 2 * n, H))), 3)
        c = _ms(lambda: gather_rows(gate_up, rows, w_in), 3)
        print(f"{name:9s} experts' gate_up rows:                 gather {b:7.1f}  flat index_select {c:7.1f} ms")
        del w_in
        ids = torch.randperm(E, generator=g)[:8]
        x = torch.randn(8, H, generator=g).to(dt)
        es = ids.sort().values
        offs = torch.bincount(es, minlength=E).cumsum(0).to(torch.int32)
        wt = gate_up.transpose(1, 2)
        a = _ms(lambda: torch._grouped_mm(x, wt, offs=offs), 15)
        torch._dynamo.reset()
        bmm = torch.compile(lambda w, i, v: torch.bmm(w[i], v.unsqueeze(-1)).squeeze(-1), backend="inductor")
        with torch.no_grad():
            b = _ms(lambda: bmm(gate_up, es, x), 15)
        print(f"{name:9s} 8-pair gate/up GEMV: _grouped_mm {a:7.2f}  Inductor bmm(w[ids], x) {b:7.2f} ms")
        del gate_up
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
