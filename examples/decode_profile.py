"""Where one dense decode step of SmolLM2 goes on the CPU (issue 34): ms per part, with the memory floor beside it.

    python examples/decode_profile.py                         # SmolLM2, fp32 and bf16, dense pop_fx.compile(sparsity=0)
    python examples/decode_profile.py --dtypes bfloat16 --steps 32 --json out/profile.json
    python examples/decode_profile.py --model 1b --layers 4   # a 1B-shaped Llama stack (random weights), 4 layers
    python examples/decode_profile.py --inductor freezing=1   # the same profile under an Inductor setting
    python examples/decode_profile.py --sparsity 0.5 --proxy int8-values   # int8-values r 0.5 γ 2 (issue 31)

For each dtype, one model compiled with ``pop_fx.compile(model, sparsity=0)`` (regional, as the user gets it):

1. ``generate()`` ms per new token, with the dynamic cache and with the static one (``cache_implementation="static"``),
   and the lean greedy loop (``pop_fx.greedy``: one forward per token, ``logits_to_keep=1``, argmax)
   over each cache: the difference is ``generate()``'s own per-step work.
2. ``torch.profiler`` over ``--steps`` steps of the lean loop (dynamic cache), Inductor's C++ kernels recorded
   (``cpp.enable_kernel_profile``); self CPU time per step grouped into parts: the layers' linears (weights
   streamed: attention projections, FFN), the LM head, attention (SDPA), the KV cache update, Inductor's fused C++
   kernels (norms, rotary, residual adds, activations), other ATen ops. The step's wall time *without* the profiler
   minus the sum of the parts is the Python around the kernels (Dynamo's guards, the compiled wrappers, the regional
   block calls, POP's state lookup, the cache objects).
3. The floor: the dense weight bytes read per token (the tied embedding read again as the LM head) over the read
   bandwidth of this machine, measured in the same process (a sum over a 1 GiB buffer, 2 threads).

Not in the tests: it times. Figures in docs/decode_speed.md name this command and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import torch

import pop_fx
from pop_fx.fastgen import greedy
from pop_fx.tools.models import load_model

PROMPT = "The capital of France is"
THREADS = 2


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of a streaming read (``sum`` over a buffer far larger than any cache), best of ``reps``."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, a tied LM head a second time."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        n += head.weight.numel() * head.weight.element_size()
    return n - emb.weight.numel() * emb.weight.element_size() + emb.weight[0].numel() * emb.weight.element_size()


def one_b_stack(layers: int, dtype):
    """A Llama-3.2-1B-shaped model (hidden 2048, FFN 8192, 32 heads / 8 KV heads, vocab 128256) of ``layers``
    layers, random weights, tied embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval(), None


def per_token_ms(run, reps: int) -> float:
    """Median ms per decode token over ``reps`` runs of ``run() -> stamps``."""
    rates = []
    for _ in range(reps):
        t = run()
        rates.append((t[-1] - t[0]) / (len(t) - 1) * 1e3)
    return statistics.median(rates)


def generate_stamps(model, ids, n: int, static: bool):
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    st = StepStamps()
    kw = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([st]), **kw)
    return st.t


def part_of(name: str, shapes, head_rows: int, hidden: int) -> str:
    """The part of the step an op belongs to."""
    if name.startswith(("cpp_fused", "graph_", "kernel_cpp")):
        return "Inductor C++ kernels (GEMV reductions, norms, rotary, adds)"
    if name in ("aten::mm", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm",
                "mkl::_mkl_linear", "aten::bmm") or "linear" in name:
        dims = [d for s in (shapes or []) for d in (s or [])]
        if head_rows in dims:
            return "LM head"
        if any(d > hidden for d in dims):
            return "FFN linears"
        return "attention linears"
    if name in ("TorchDynamo Cache Lookup",):
        return "Python: Dynamo guards"
    if name.startswith(("Torch-Compiled Region", "## Call CompiledFxGraph", "Pregraph bytecode", "## Call")):
        return "Python: compiled wrappers and regional glue"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (SDPA)"
    if name in ("aten::index_copy_", "aten::index_copy", "aten::cat", "aten::copy_", "aten::slice_scatter",
                "aten::index_put_"):
        return "KV cache update and copies"
    return "other ATen ops"


def profile(model, ids, steps: int, head_rows: int, hidden: int) -> dict[str, float]:
    """Self CPU ms per decode step of each part (the lean loop, dynamic cache)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    greedy(model, ids, 4)  # warm
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        greedy(model, ids, steps + 1)
    parts, other = defaultdict(float), defaultdict(float)
    events = prof.events()
    # Only what runs inside a decode step (pop_fx.greedy marks each one): the prefill is left out.
    spans = [e.time_range for e in events if e.name == "pop_fx.greedy.step"]
    for e in events:
        if e.name == "pop_fx.greedy.step" or e.device_type.name != "CPU":
            continue
        if not any(s.start <= e.time_range.start <= s.end for s in spans):
            continue
        part = part_of(e.name, e.input_shapes, head_rows, hidden)
        parts[part] += e.self_cpu_time_total / 1e3
        if part == "other ATen ops":
            other[e.name] += e.self_cpu_time_total / 1e3 / steps
    top = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    print("  other ATen ops, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    return {k: v / steps for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default) or '1b' (a 1B-shaped random Llama stack)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 1B-shaped stack (default 4)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed run (default 64)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps profiled (default 32)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per row, median (default 3)")
    ap.add_argument("--sparsity", type=float, default=0.0, help="0 = dense (default); 0.5 = POP r 0.5 γ 0.1")
    ap.add_argument("--proxy", default=None, help="PopConfig.candidate_proxy with --sparsity, e.g. int8-values")
    ap.add_argument("--whole", action="store_true", help="regional=False: the whole model as one graph")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Inductor settings for the compiled model (PopConfig.inductor), e.g. freezing=1")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    torch._inductor.config.cpp.enable_kernel_profile = True
    inductor = {k: _value(v) for k, v in (s.split("=", 1) for s in args.inductor)}
    gbps = read_bandwidth()
    print(f"{datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}, {THREADS} threads, read bandwidth "
          f"{gbps:.1f} GB/s, inductor {inductor or 'defaults'}", flush=True)
    out = {"date": f"{datetime.now():%Y-%m-%d %H:%M}", "read_GBps": gbps, "inductor": inductor, "rows": {}}
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        if args.model == "1b":
            model, tok = one_b_stack(args.layers, dtype)
            ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
        else:
            model, tok = load_model(args.model, dtype)
            ids = tok(PROMPT, return_tensors="pt").input_ids
        fields = dict(sparsity=args.sparsity, regional=not args.whole)
        if args.proxy:
            fields.update(candidate_proxy=args.proxy, candidate_ratio=2.0 if args.proxy == "int8-values" else 0.1)
        if inductor:
            fields["inductor"] = inductor
        pop_fx.compile(model, **fields)
        nbytes = weight_bytes(model)
        head_rows = model.get_output_embeddings().weight.shape[0]
        hidden = model.config.hidden_size
        t = time.perf_counter()
        generate_stamps(model, ids, 8, static=False)
        generate_stamps(model, ids, 8, static=True)
        greedy(model, ids, 8)
        greedy(model, ids, 8, static=True)
        print(f"  {dt}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        n = args.tokens
        rows = {
            "generate(), dynamic cache": per_token_ms(lambda: generate_stamps(model, ids, n, False), args.reps),
            "generate(), static cache": per_token_ms(lambda: generate_stamps(model, ids, n, True), args.reps),
            "lean loop, dynamic cache": per_token_ms(lambda: greedy(model, ids, n, stamps=True)[1], args.reps),
            "lean loop, static cache": per_token_ms(lambda: greedy(model, ids, n, static=True, stamps=True)[1],
                                                    args.reps),
        }
        parts = profile(model, ids, args.steps, head_rows, hidden)
        wall = rows["lean loop, dynamic cache"]
        parts["Python around the kernels (wall - parts)"] = wall - sum(parts.values())
        floor = nbytes / gbps / 1e6
        print(f"\n{args.model} {dt}, batch 1, {nbytes / 1e9:.3f} GB of weights per token, floor {floor:.2f} ms "
              f"at {gbps:.1f} GB/s; dense GB/s = weight bytes / step time")
        print(f"{'step':44s} {'ms/token':>9s} {'tok/s':>7s} {'GB/s':>6s}")
        for k, v in rows.items():
            print(f"{k:44s} {v:9.2f} {1e3 / v:7.1f} {nbytes / v / 1e6:6.1f}")
        print(f"{'generate() own work (dynamic - lean)':44s} "
              f"{rows['generate(), dynamic cache'] - rows['lean loop, dynamic cache']:9.2f}")
        print(f"\nparts of one lean-loop step (dynamic cache), self CPU ms, profiler over {args.steps} steps")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {k:50s} {v:7.2f}  {100 * v / wall:5.1f} %")
        out["rows"][dt] = {"steps": rows, "parts": parts, "weight_bytes": nbytes, "floor_ms": floor}
        del model
        torch._dynamo.reset()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


def _value(s: str):
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


if __name__ == "__main__":
    main()
