"""Batch-1 GEMV on this CPU, five ways, on SmolLM2's projection shapes: why ``pop::linear`` has a reduction choice.

    python examples/linear_variants.py                 # fp32 and bf16, 2 threads

ms per call and GB/s of weight bytes, each shape cycled over 30 copies (2 for the LM head) so the weights come from
DRAM as in a decode step:

* ``F.linear`` — ATen (what Inductor calls for a linear without pop-fx); ``mv`` — ``torch.mv``;
* ``inductor reduction`` — ``(W · x).sum(-1)`` compiled by Inductor (``pop_fx.ops.linear.linear_reduce``'s form);
* ``mkl packed`` (fp32) / ``mkldnn packed`` — the prepacked-weight linears Inductor's ``freezing`` lowers to on the
  CPU (weights become constants of the graph).

The figures in docs/decode_speed.md come from this script (date there).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"gate/up [1536,576]": (1536, 576), "down [576,1536]": (576, 1536), "q/o [576,576]": (576, 576),
          "LM head [49152,576]": (49152, 576)}


def bench(f, ws, x, reps: int = 7) -> float:
    for w in ws:
        f(x, w)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for w in ws:
            f(x, w)
        ts.append((time.perf_counter() - t) / len(ws))
    return statistics.median(ts) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    red = torch.compile(lambda x, w: (w.float() * x.float()).sum(-1).to(x.dtype), dynamic=False)
    for dt in (torch.float32, torch.bfloat16):
        for name, (n, k) in SHAPES.items():
            ws = [torch.randn(n, k).to(dt) for _ in range(2 if n > 10000 else 30)]
            x = torch.randn(1, k).to(dt)
            nb = n * k * ws[0].element_size()
            res = {"F.linear": bench(F.linear, ws, x), "mv": bench(lambda x, w: torch.mv(w, x[0]), ws, x),
                   "inductor reduction": bench(lambda x, w: red(x[0], w), ws, x)}
            if dt == torch.float32:
                pk = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in ws]
                orig = dict(zip(map(id, pk), ws))
                res["mkl packed"] = bench(lambda x, p: torch.ops.mkl._mkl_linear(x, p, orig[id(p)], None, 1), pk, x)
            pkd = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
            res["mkldnn packed"] = bench(lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                                         pkd, x)
            print(f"{str(dt).split('.')[1]:8s} {name:20s} " +
                  "  ".join(f"{k} {v:.3f} ms {nb / v / 1e6:.1f} GB/s" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
