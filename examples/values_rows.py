"""int8 gate+up products at batch 1, the routes issue 31 compared (2026-12-05 04:16): aten._weight_int8pack_mm
(bf16 x) vs an Inductor-compiled fp32 reduction over the int8 rows vs torch._int_mm with per-token int8 x; bf16 and
fp32 dense GEMV beside them. One process, interleaved, cycling the layers so weights come from memory.

    python examples/values_rows.py

The ``inductor_reduce`` row is the bare reduction (fp32 x, no bf16 roundings); the lowering that shipped,
``pop_fx.lowbit.int8_rows_reduce``, adds the packed kernel's roundings and is timed in place by
``pop-fx bench --pop-proxy int8-values --choices`` (docs/benchmarks.md, int8-values)."""
import time, statistics, sys
import torch
torch.manual_seed(0)
shapes = {"smollm2": (576, 1536), "1b": (2048, 5632)}
def bench(fn, n=50):
    for _ in range(5): fn()
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n * 1e3
for name, (d, f) in shapes.items():
    layers = 8 if name == "1b" else 30
    W = [torch.randn(2 * f, d) * 0.02 for _ in range(layers)]
    q = [(w / (w.abs().amax(1, keepdim=True) / 127)).round().clamp(-127, 127).to(torch.int8).contiguous() for w in W]
    s = [(w.abs().amax(1) / 127) for w in W]
    sb = [x.to(torch.bfloat16) for x in s]
    Wb = [w.to(torch.bfloat16) for w in W]
    qt = [x.t().contiguous().t() for x in q]  # _int_mm wants [K, N]: pass q.t() (a view of [N,K])
    x = torch.randn(1, d)
    xb = x.to(torch.bfloat16)
    i = [0]
    def nxt():
        i[0] = (i[0] + 1) % layers; return i[0]
    def pack():
        k = nxt(); return torch.ops.aten._weight_int8pack_mm(xb, q[k], sb[k])
    red = torch.compile(lambda x, q, s: (x[:, None, :] * q[None].float()).sum(-1) * s, dynamic=False)
    def reduce_():
        k = nxt(); return red(x, q[k], s[k])
    def intmm():
        k = nxt()
        sx = x.abs().amax(-1, keepdim=True) / 127
        xq = (x / sx).round().to(torch.int8)
        return torch._int_mm(xq, q[k].t()).float() * sx * s[k]
    def dense32():
        k = nxt(); return x @ W[k].t()
    def dense16():
        k = nxt(); return xb @ Wb[k].t()
    fns = dict(pack=pack, inductor_reduce=reduce_, int_mm=intmm, dense_fp32=dense32, dense_bf16=dense16)
    try:
        intmm()
    except Exception as e:
        print("int_mm fails:", e); fns.pop("int_mm")
    ref = x @ W[1].t()
    times = {k: [] for k in fns}
    for _ in range(5):
        for k, fn in fns.items():
            times[k].append(bench(fn))
    for k, v in times.items():
        ms = statistics.median(v)
        by = 2 * f * d * (1 if k in ("pack", "inductor_reduce", "int_mm") else (4 if k == "dense_fp32" else 2))
        print(f"{name:8s} {k:16s} {ms:7.3f} ms  {by / ms / 1e6:6.1f} GB/s")
    i[0] = 0
    for k, fn in fns.items():
        i[0] = 0; y = fn().float()
        print(f"   {k} rel err vs fp32 {((y - ref).norm() / ref.norm()).item():.4f}")
