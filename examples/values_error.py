"""How far the int8-values method's activations are from exact ones on SmolLM2, and why they are bf16.

    python examples/values_error.py [--tokens 256] [--threads 2]

``candidate_proxy="int8-values"`` uses H̃ = act(g̃) · ũ, computed from the per-row int8 copy of gate and up
(``pop_fx.lowbit.values_activations``: x rounded to bf16, int8 × bf16 products, bf16 results), as the chosen
channels' activations. This script feeds the first ``--tokens`` tokens of the packaged text through SmolLM2
(fp32), takes every layer's FFN input x, and prints per layer the per-token relative L2 error
||H̃ - H|| / ||H|| (mean over tokens) against the exact fp32 H, beside the same error for the int8 copy
dequantized in fp32 (the weights' rounding alone). Then one gate+up call of ``aten._weight_int8pack_mm`` at
batch 1 on SmolLM2's shape ([2·1536, 576] int8) with bf16, fp16 and fp32 activations (median of 200 calls):
the kernel the method uses, and why its activations are bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pop_fx import lowbit
from pop_fx.tools.evaluation.text import read_text
from pop_fx.tools.models import load_model


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over tokens of ||approx - exact|| / ||exact|| (rows are tokens)."""
    return (torch.linalg.vector_norm(approx - exact, dim=-1) / torch.linalg.vector_norm(exact, dim=-1)).mean().item()


def ffn_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's FFN input x ([tokens, d]) on ``ids``."""
    xs, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return xs


def layer_errors(mlp, x: torch.Tensor) -> tuple[float, float]:
    """(int8-values H̃, fp32 dequantized int8) relative errors of one gated FFN's H on x."""
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    d_ff = gate.shape[0]
    h = F.silu(x @ gate.T) * (x @ up.T)
    q, s = lowbit.values_tables(gate, up)
    h_values = lowbit.values_activations(x, q, s, d_ff, 0)  # 0 = silu (pop_fx.activations.ACTIVATIONS)
    (qg, sg), (qu, su) = lowbit.quantize_rows(gate), lowbit.quantize_rows(up)
    h_deq = F.silu(x @ lowbit.dequantize(qg, sg, gate.shape[1]).T) * (x @ lowbit.dequantize(qu, su, up.shape[1]).T)
    return rel_err(h_values, h), rel_err(h_deq, h)


def time_int8_gate_up(q: torch.Tensor, s: torch.Tensor, d: int, calls: int = 200) -> dict[str, float]:
    """Median µs of one batch-1 ``_weight_int8pack_mm`` call per activation dtype (scales in that dtype)."""
    out = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(1, d).to(dt)
        sd = s.to(dt)
        f = lambda: torch.ops.aten._weight_int8pack_mm(x, q, sd)  # noqa: E731
        for _ in range(10):
            f()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        out[str(dt).replace("torch.", "")] = statistics.median(ts) * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens of the packaged text fed through (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the timing (default %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    text, _ = read_text(None)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    xs = ffn_inputs(model, ids)
    print(f"SmolLM2 fp32, {ids.shape[1]} tokens of the packaged text; per-token relative L2 error of H, mean over tokens")
    print(f"{'layer':>5} {'int8-values H̃':>15} {'fp32 dequant':>13}")
    rows = []
    for i, (layer, x) in enumerate(zip(model.model.layers, xs)):
        rows.append(layer_errors(layer.mlp, x))
        print(f"{i:5d} {100 * rows[-1][0]:14.2f}% {100 * rows[-1][1]:12.2f}%")
    values, deq = zip(*rows)
    print(f"median layer: int8-values {100 * statistics.median(values):.2f}%, fp32 dequantization "
          f"{100 * statistics.median(deq):.2f}%; worst layer: int8-values {100 * max(values):.2f}%, "
          f"fp32 dequantization {100 * max(deq):.2f}%")
    mlp = model.model.layers[0].mlp
    q, s = lowbit.values_tables(mlp.gate_proj.weight, mlp.up_proj.weight)
    us = time_int8_gate_up(q, s.float(), mlp.gate_proj.weight.shape[1])
    print(f"one gate+up call, batch 1, [{q.shape[0]}, {q.shape[1]}] int8, {args.threads} threads, median µs: "
          + ", ".join(f"{k} {v:.0f}" for k, v in us.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
