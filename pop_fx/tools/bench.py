"""`pop-fx bench`: decode speed of POP against dense and the sliced ideal, side by side in one process.

Variants (each its own compiled module over the *same* Parameters, except the sliced ideal):

* ``dense-eager``   — the model as is;
* ``dense-inductor`` — stock ``torch.compile`` (Inductor, default options);
* ``sliced``        — every FFN physically cut to the n_keep channels POP computes per step, under Inductor
                      (the speed POP could reach at zero overhead);
* ``pop``           — ``backend="pop"`` at the requested r and γ;
* ``pop-full``      — ``backend="pop"`` with full re-evaluation (γ = 2);
* ``pop-proxy``     — ``backend="pop"`` with int8 proxy-scored candidates (``candidate_proxy="int8"``) at
                      ``--proxy-gamma`` (beyond the paper; see README "Proxy-scored candidates").

Two workloads: ``--ffn-only`` times one FFN layer (a residual stack of K gated FFNs whose weights
together exceed the caches, so each step streams them from memory, as in a real model), otherwise
end-to-end ``generate()`` decode tokens/s (prefill excluded). Variants are timed in interleaved rounds
so that machine noise falls on all of them alike; the medians and the ratios are reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pop_fx.tools.timing import StepStamps

VARIANTS = ("dense-eager", "dense-inductor", "sliced", "pop", "pop-full", "pop-proxy")
DEFAULT_VARIANTS = VARIANTS[:5]


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------


class GatedFFN(nn.Module):
    def __init__(self, d: int, f: int, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, f, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(f, d, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class FFNStack(nn.Module):
    """K gated FFN layers with residual adds: one FFN per 'layer', weights larger than the caches."""

    def __init__(self, d: int, f: int, k: int, dtype=torch.float32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(GatedFFN(d, f, dtype) for _ in range(k))
            for p in self.parameters():
                nn.init.normal_(p, std=d ** -0.5)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def sliced_copy(model: nn.Module, n_keep_of) -> nn.Module:
    """A copy of ``model`` whose every gated/plain FFN keeps only n_keep channels (the first ones: speed only)."""
    from pop_fx.sites import find_module_sites

    out = copy.deepcopy(model)
    sites, _ = find_module_sites(out)
    for s in sites:
        if s.kind not in ("gated", "plain", "fused_gated"):
            continue
        k = n_keep_of(s.d_ff)
        for name, mod in list(s.module.named_children()):
            if not isinstance(mod, nn.Linear):
                continue
            if mod is s.down:
                new = nn.Linear(k, mod.out_features, bias=mod.bias is not None, dtype=mod.weight.dtype)
                new.weight.data = mod.weight.data[:, :k].contiguous()
                if mod.bias is not None:
                    new.bias.data = mod.bias.data.clone()
            elif mod.out_features in (s.d_ff, 2 * s.d_ff):
                rows = k if mod.out_features == s.d_ff else 2 * k
                idx = torch.arange(k) if rows == k else torch.cat([torch.arange(k), s.d_ff + torch.arange(k)])
                new = nn.Linear(mod.in_features, rows, bias=mod.bias is not None, dtype=mod.weight.dtype)
                new.weight.data = mod.weight.data[idx].contiguous()
                if mod.bias is not None:
                    new.bias.data = mod.bias.data[idx].clone()
            else:
                continue
            setattr(s.module, name, new)
        if hasattr(s.module, "intermediate_size"):
            s.module.intermediate_size = k
    return out


def _shallow(model: nn.Module) -> nn.Module:
    """A second top-level module over the same Parameters: ``compile`` in place touches only the top."""
    clone = copy.copy(model)
    clone.__dict__ = dict(model.__dict__)
    clone._compiled_call_impl = None
    return clone


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    variant: str
    times: list = field(default_factory=list)
    prefill_s: float = float("nan")
    extra_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def proxy_config(config, gamma: float = 1.0, proxy: str = "int8"):
    """The ``pop-proxy`` variant's config: proxy-scored candidates over a band of width ``gamma``."""
    return config.replace(candidate_proxy=proxy, candidate_ratio=gamma)


def _build_variants(model, config, variants, n_keep_of, proxy_gamma: float = 1.0, proxy: str = "int8"):
    import pop_fx

    built = {}
    for v in variants:
        torch.manual_seed(0)
        if v == "dense-eager":
            built[v] = model
        elif v == "dense-inductor":
            m = _shallow(model)
            m.compile(backend="inductor")
            built[v] = m
        elif v == "sliced":
            m = sliced_copy(model, n_keep_of)
            m.compile(backend="inductor")
            built[v] = m
        elif v == "pop":
            built[v] = pop_fx.compile(_shallow(model), config)
        elif v == "pop-full":
            built[v] = pop_fx.compile(_shallow(model), config.replace(candidate_ratio=2.0))
        elif v == "pop-proxy":
            built[v] = pop_fx.compile(_shallow(model), proxy_config(config, proxy_gamma, proxy))
        else:
            raise ValueError(f"variant={v!r} is invalid: allowed one of {list(VARIANTS)}")
    return built


def bench_ffn(d: int, f: int, k: int, config, *, batch: int = 1, prompt: int = 16, steps: int = 20,
              rounds: int = 5, dtype=torch.float32, variants=DEFAULT_VARIANTS, proxy_gamma: float = 1.0,
              proxy: str = "int8") -> dict[str, Cell]:
    """Per-layer decode-step time of a K-layer FFN stack (ms), each variant compiled once."""
    from pop_fx.partition import partition_sizes

    model = FFNStack(d, f, k, dtype).eval()
    n_keep_of = lambda ff: partition_sizes(ff, config.sparsity, config.candidate_ratio).n_keep  # noqa: E731
    built = _build_variants(model, config, variants, n_keep_of, proxy_gamma, proxy)
    x_pre = torch.randn(batch, prompt, d, dtype=dtype)
    x_dec = torch.randn(batch, 1, d, dtype=dtype)
    cells = {v: Cell(v) for v in variants}
    with torch.no_grad():
        for v, m in built.items():  # compile + warm up: prefill then decode graphs
            for _ in range(2):
                m(x_pre)
                m(x_dec)
            t0 = time.perf_counter()
            m(x_pre)
            cells[v].prefill_s = time.perf_counter() - t0
        for _ in range(rounds):
            for v, m in built.items():
                m(x_pre)  # each round re-partitions, as a new prompt would
                t0 = time.perf_counter()
                for _ in range(steps):
                    m(x_dec)
                cells[v].times.append((time.perf_counter() - t0) / steps / k * 1e3)
    _extra(built, cells)
    return cells


def bench_generate(model, tok, config, *, batch: int = 1, prompt: str | None = None, new_tokens: int = 32,
                   rounds: int = 3, variants=DEFAULT_VARIANTS, proxy_gamma: float = 1.0,
              proxy: str = "int8") -> dict[str, Cell]:
    """End-to-end greedy decode tokens/s (prefill excluded) of each variant."""
    from pop_fx.partition import partition_sizes

    n_keep_of = lambda ff: partition_sizes(ff, config.sparsity, config.candidate_ratio).n_keep  # noqa: E731
    built = _build_variants(model, config, variants, n_keep_of, proxy_gamma, proxy)
    if tok is None:  # synthetic model: a fixed random prompt of 24 tokens
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, 24), generator=g)
        enc, pad = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    else:
        text = prompt or "In the beginning, God created the heavens and the earth. The earth was formless and empty."
        enc = tok([text] * batch, return_tensors="pt")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(do_sample=False, pad_token_id=pad)
    cells = {v: Cell(v) for v in variants}

    def gen(m, n):
        """(prefill s, decode tokens/s) of one generate(): a logits processor stamps every step, so the
        decode rate is taken between the first and the last token of the same call (prefill excluded)."""
        from transformers import LogitsProcessorList

        stamps = StepStamps()
        t0 = time.perf_counter()
        m.generate(**enc, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([stamps]), **kw)
        return stamps.t[0] - t0, stamps.decode_rate()

    with torch.no_grad():
        for v, m in built.items():  # compile every graph these lengths need
            gen(m, new_tokens)
            gen(m, new_tokens)
        for _ in range(rounds):
            for v, m in built.items():
                prefill_s, rate = gen(m, new_tokens)
                cells[v].prefill_s = prefill_s
                cells[v].times.append(rate)  # tokens/s
    _extra(built, cells)
    return cells


def _extra(built, cells):
    import pop_fx

    for v in ("pop", "pop-full", "pop-proxy"):
        if v in built:
            cells[v].extra_bytes = pop_fx.report(built[v]).extra_bytes


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def synthetic_1b(dtype=torch.float32):
    """A Llama-shaped ~1.1B model with random weights (speed does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(dtype).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ffn-only", action="store_true", help="time one FFN layer (a stack of K) instead of generate()")
    parser.add_argument("--shape", default="1b", choices=["1b", "smollm2"],
                        help="--ffn-only shape: 1b = d 2048, d_ff 5632; smollm2 = d 576, d_ff 1536")
    parser.add_argument("--layers", type=int, default=8, help="--ffn-only: FFN layers in the stack (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--proxy-gamma", type=float, default=1.0, help="candidate_ratio of the pop-proxy variant (default %(default)s)")
    parser.add_argument("--proxy", default="int8", choices=["int8", "int3", "int8-gate"],
                        help="candidate_proxy of the pop-proxy variant (default %(default)s)")
    parser.add_argument("--full", action="store_true",
                        help="every cell: r in {0.3, 0.5} x batch {1, 8} x {float32, bfloat16} (scope='sequence' "
                             "at batch 8 on smollm2); --model synthetic-1b for the 1B-shaped model")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.cli import config_from_args
    from pop_fx.tools.models import parse_dtype

    torch.set_num_threads(args.threads)
    config = config_from_args(args)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: {v!r} is invalid: allowed {list(VARIANTS)}")
    cells = [(config, args.batch, parse_dtype(args.dtype))]
    if args.full:
        cells = []
        for dt in (torch.float32, torch.bfloat16):
            for b in (1, 8):
                for r in (0.3, 0.5):
                    scope = "sequence" if (b > 1 and args.model == "smollm2" and not args.ffn_only) else config.scope
                    cells.append((config.replace(sparsity=r, scope=scope), b, dt))
    tables = [_run_cell(args, cfg, b, dt, variants) for cfg, b, dt in cells]
    if args.json:
        print(json.dumps(tables if args.full else tables[0], indent=2))
    return 0


def _run_cell(args, config, batch, dtype, variants) -> dict:
    # The variants are compiled copies of one model class, and Dynamo's recompile limit counts the graphs of
    # all of them against one code object: past it a variant would silently run uncompiled (and POP
    # unpruned). Give each variant the default allowance, and refuse to report a run that still hit it.
    from pop_fx.api import recompile_limit_hits

    torch._dynamo.reset()
    hits = recompile_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * len(variants)):
        out = _measure_cell(args, config, batch, dtype, variants)
    if recompile_limit_hits() > hits:
        raise RuntimeError("pop-fx bench: Dynamo's recompile limit was hit, so some variant ran uncompiled; "
                           "the timings are void (run fewer variants per process)")
    return out


def _measure_cell(args, config, batch, dtype, variants) -> dict:
    from pop_fx.tools.models import load_model

    if args.ffn_only:
        d, f = (2048, 5632) if args.shape == "1b" else (576, 1536)
        cells = bench_ffn(d, f, args.layers, config, batch=batch, rounds=args.rounds, dtype=dtype, variants=variants,
                          proxy_gamma=args.proxy_gamma, proxy=args.proxy)
        unit, higher_better, what = "ms/layer", False, f"one FFN layer d={d} d_ff={f} (stack of {args.layers})"
    else:
        if args.model == "synthetic-1b":
            model, tok = synthetic_1b(dtype), None
        else:
            model, tok = load_model(args.model, dtype)
        cells = bench_generate(model, tok, config, batch=batch, new_tokens=args.new_tokens, rounds=args.rounds,
                               variants=variants, proxy_gamma=args.proxy_gamma, proxy=args.proxy)
        unit, higher_better, what = "tokens/s", True, f"{args.model} generate() decode"
    base = cells.get("dense-inductor")
    ideal = cells.get("sliced")

    def speedup(c, ref):
        if ref is None:
            return float("nan")
        return c.median / ref.median if higher_better else ref.median / c.median

    rows = [dict(variant=v, median=c.median, unit=unit, samples=c.times, prefill_s=c.prefill_s,
                 speedup_vs_dense_inductor=speedup(c, base), speedup_vs_sliced=speedup(c, ideal),
                 extra_mib=c.extra_bytes / 2**20) for v, c in cells.items()]
    meta = dict(what=what, config=config.as_dict(), batch=batch, dtype=str(dtype), threads=args.threads,
                torch=torch.__version__)
    if not args.json:
        print(f"{what}, batch {batch}, {dtype}, {args.threads} threads, r={config.sparsity} "
              f"γ={config.candidate_ratio} scope={config.scope}")
        print(f"{'variant':16s} {unit:>10s} {'× dense-ind':>12s} {'× sliced':>9s} {'prefill s':>10s} {'extra MiB':>10s}")
        for r in rows:
            print(f"{r['variant']:16s} {r['median']:10.3f} {r['speedup_vs_dense_inductor']:12.3f} "
                  f"{r['speedup_vs_sliced']:9.3f} {r['prefill_s']:10.4f} {r['extra_mib']:10.1f}")
        print("(× columns: speed relative to that variant, > 1 is faster)\n")
    gc.collect()
    return dict(meta=meta, rows=rows)
