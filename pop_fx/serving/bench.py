"""Serving measurements on SmolLM2: weight bytes per decode step, and decode step time, at concurrency N.

    python -m pop_fx.serving.bench bytes --concurrency 1 4 16          # per-request vs batch-shared partitions
    python -m pop_fx.serving.bench speed --concurrency 1 4 16          # dense Inductor, pop_fx.compile, ragged

Prompts are N different windows of ``shared/data/web_bible.txt`` (64 tokens each). Bytes are counted from the
channels each step actually uses (no timing, exact); times are medians over interleaved rounds in one process
(the machine is shared with other work, so only ratios measured in the same round are meaningful).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pop_fx.config import PopConfig
from pop_fx.serving.phases import DECODE, LAST

TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "web_bible.txt"


def prompts(tok, n: int, length: int = 64) -> list[list[int]]:
    ids = tok(TEXT.read_text()[:400_000])["input_ids"]
    stride = max(length, (len(ids) - length) // max(n, 1))
    return [ids[i * stride : i * stride + length] for i in range(n)]


# ---------------------------------------------------------------- bytes -------------------------------------------
@torch.no_grad()
def bytes_table(model, tok, concurrency: list[int], config: PopConfig, steps: int) -> list[dict]:
    """Per decode step and layer, channels read: dense, one batch-shared partition, per-request partitions
    (the union of the batch's rows over the shared weights: what a gathered-row kernel reads), and per-request
    with per-slot layouts (each row reads its own slot's R ∪ C copy)."""
    from pop_fx.serving.ragged_decode import keep_mask
    from pop_fx.serving.engine import Engine, Request, Spec

    d_model = model.config.hidden_size
    elt = 2  # bytes per weight in bf16, the serving dtype; the ratios do not depend on it
    rows = []
    for n in concurrency:
        eng = Engine(model, config, max_slots=n)
        used_gu, used_dn = [], []  # per (step, layer): channel counts

        def observe(f, args, out):
            st = f.step
            if st.has_prefill:
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            h = f.mlp.act_fn(f.mlp.gate_proj(x)) * f.mlp.up_proj(x)
            keep = keep_mask(h, st.slot, st.phase, f.wd_norm, f.rc_idx, f.sizes.n_R, f.sizes.n_select) > 0
            rc = torch.zeros_like(keep)
            rc.scatter_(1, f.rc_idx[st.slot], True)
            used_gu.append(int(rc.any(0).sum()))
            used_dn.append(int(keep.any(0).sum()))

        hooks = [f.register_forward_hook(observe) for f in eng.ffns]
        reqs = [Request(i, Spec(p, steps + 1)) for i, p in enumerate(prompts(tok, n))]
        for r in reqs:
            eng.admit(r)
        logits = eng.forward([(r, r.feed, [LAST] * len(r.feed)) for r in reqs])  # prompts, one chunk each
        last = [int(lg.argmax()) for lg in logits]  # then every request decodes ``steps`` greedy tokens in lockstep
        for _ in range(steps):
            logits = eng.forward([(r, [t], [DECODE]) for r, t in zip(reqs, last)])
            last = [int(lg.argmax()) for lg in logits]
        for h in hooks:
            h.remove()
        sz = eng.ffns[0].sizes
        d_ff = model.config.intermediate_size
        L = len(eng.ffns)
        per_ch = d_model * elt  # bytes of one channel's row in one projection
        dense = 3 * d_ff * per_ch * L
        shared = (2 * (sz.n_R + sz.n_C) + sz.n_keep) * per_ch * L
        union = (statistics.mean(used_gu) * 2 + statistics.mean(used_dn)) * per_ch * L
        slot_layouts = n * 3 * (sz.n_R + sz.n_C) * per_ch * L
        rows.append({"N": n, "dense": dense, "shared": shared, "union": union, "layouts": slot_layouts,
                     "gu_frac": statistics.mean(used_gu) / d_ff, "dn_frac": statistics.mean(used_dn) / d_ff})
    return rows


def print_bytes(rows: list[dict], config: PopConfig) -> None:
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    print(f"FFN weight bytes read per decode step (bf16), SmolLM2, sparsity={config.sparsity}, "
          f"candidate_ratio={config.candidate_ratio}; × dense in brackets")
    print("| concurrency | dense | one batch-shared partition | per-request partitions, shared weights (union of rows)"
          " | per-request, per-slot R∪C layouts | union: gate/up rows, down rows (fraction of d_ff) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["dense"]
        print(f"| {r['N']} | {mb(d)} (1.00) | {mb(r['shared'])} ({r['shared'] / d:.2f}) | {mb(r['union'])} "
              f"({r['union'] / d:.2f}) | {mb(r['layouts'])} ({r['layouts'] / d:.2f}) | {r['gu_frac']:.2f}, "
              f"{r['dn_frac']:.2f} |")


# ---------------------------------------------------------------- speed -------------------------------------------
@torch.no_grad()
def speed_table(model, tok, concurrency: list[int], config: PopConfig, rounds: int, steps: int,
                variants: list[str]) -> list[dict]:
    """Median decode-step ms per variant, rounds interleaved. Every variant decodes N lockstep requests from
    the same prompts with HF's batched forward and a DynamicCache (a decode-only step of an engine)."""
    import copy

    from transformers import DynamicCache

    import pop_fx
    from pop_fx.serving.ffn import StepInfo, swap_mlps

    # Every variant calls the same HF forward code object, and Dynamo's recompile limit counts graphs per code
    # object: 4 variants × (static, then dynamic cache length) × prefill/decode passes 8.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    out = []
    for n in concurrency:
        ids = torch.tensor(prompts(tok, n))
        runners = {}
        for v in variants:
            m = copy.deepcopy(model)
            step = StepInfo()
            if v == "dense-inductor":
                fwd, pre = torch.compile(m, backend="inductor"), m
            elif v == "pop_fx.compile":
                pop_fx.compile(m, config.replace(scope="batch"))
                fwd = pre = m
            else:  # ragged, ragged-layouts: MLPs swapped, decode compiled by Inductor, prefill eager
                swap_mlps(m, config, max_slots=n, step=step, layouts=v == "ragged-layouts")
                fwd, pre = torch.compile(m, backend="inductor"), m
            cache = DynamicCache(config=m.config)
            step.set(torch.arange(n).repeat_interleave(ids.shape[1]), torch.full((ids.numel(),), LAST))
            logits = pre(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            step.set(torch.arange(n), torch.full((n,), DECODE), has_prefill=False)
            runners[v] = {"m": fwd, "cache": cache, "tok": logits.argmax(-1, keepdim=True), "times": []}
        for r in range(rounds + 1):  # round 0 warms up (compiles, and Dynamo's dynamic-length recompile)
            for v, st in runners.items():
                for _ in range(steps if r else 3):
                    t0 = time.perf_counter()
                    logits = st["m"](input_ids=st["tok"], cache=st["cache"], use_cache=True).logits[:, -1]
                    st["tok"] = logits.argmax(-1, keepdim=True)
                    if r:
                        st["times"].append(time.perf_counter() - t0)
        out.append({"N": n, **{v: 1e3 * statistics.median(st["times"]) for v, st in runners.items()}})
        print(out[-1], flush=True)
    return out


def print_speed(rows: list[dict], variants: list[str]) -> None:
    print("Decode step, ms (median; × pop_fx.compile in brackets)")
    print("| concurrency | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for r in rows:
        ref = r.get("pop_fx.compile")
        cells = [f"{r[v]:.1f}" + (f" ({r[v] / ref:.2f})" if ref else "") for v in variants]
        print(f"| {r['N']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["bytes", "speed"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--candidate-ratio", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=16, help="decode steps (bytes) or steps per round (speed)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["dense-inductor", "pop_fx.compile", "ragged", "ragged-layouts"])
    args = ap.parse_args(argv)
    from pop_fx.tools.models import load_model

    model, tok = load_model("smollm2")
    model.eval()
    cfg = PopConfig(sparsity=args.sparsity, candidate_ratio=args.candidate_ratio)
    if args.what == "bytes":
        print_bytes(bytes_table(model, tok, args.concurrency, cfg, args.steps), cfg)
    else:
        print_speed(speed_table(model, tok, args.concurrency, cfg, args.rounds, args.steps, args.variants),
                    args.variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
