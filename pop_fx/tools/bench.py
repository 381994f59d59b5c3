"""`pop-fx bench`: decode speed of POP against dense and the sliced ideal, side by side in one process.

Variants (each its own compiled module over the *same* Parameters, except the copies named below):

* ``dense-eager``     — the model as is;
* ``dense-inductor``  — stock ``torch.compile`` (Inductor, default options), gate and up as two GEMVs;
* ``dense-fused``     — each gated FFN's gate and up concatenated into one projection (a copy of those
                        weights), the fusion POP's decode uses, compiled as POP is (``pop_fx.compile`` with r = 0:
                        regional, the same Inductor settings): the fair dense baseline;
* ``sliced``          — every FFN physically cut to the n_keep channels POP computes per step, gate and up
                        fused like POP's, compiled as POP is (the speed POP could reach at zero overhead: the ideal);
* ``sliced-unfused``  — the ideal with gate and up as two GEMVs (kept: on some shapes it is the faster one);
* ``pop``             — ``backend="pop"`` at the requested r and γ;
* ``pop-full``        — ``backend="pop"`` with full re-evaluation (γ = 2);
* ``pop-proxy``       — ``backend="pop"`` with proxy-scored candidates (``--proxy``, ``--proxy-gamma``);
* ``pop-values``      — ``backend="pop"`` with ``candidate_proxy="int8-values"``, γ = 2: the low-precision full
                        re-evaluation with an exact down projection over the chosen channels (its own method);
* ``pop[<choice>]``   — ``pop`` with its decode op's implementation pinned to one autotuning choice
                        (``pop_fx.autotune``: e.g. ``pop[masked]``, ``pop[gather_sum]``; ``--choices`` adds every
                        choice that serves the cell). ``pop`` itself is ``kernels="auto"``: Inductor measured the
                        choices at compile time and inlined the fastest; the table says which it took and how far
                        ``pop`` is from the best fixed choice of the run.

Ratios are against ``dense-fused`` and ``sliced`` (the same fusion as POP, so a ratio measures pruning),
falling back to ``dense-inductor`` / ``sliced-unfused`` when those did not run. A POP variant in which
not every FFN site was rewritten in both its prefill and decode graphs is refused, never timed.

Two workloads: ``--ffn-only`` times one FFN layer (a residual stack of K gated FFNs whose weights together
exceed the caches, so each step streams them from memory, as in a real model), otherwise end-to-end
``generate()`` decode tokens/s (prefill excluded, taken between the first and last new token). Variants
are timed in interleaved rounds so that machine noise falls on all of them alike; medians are reported.
On CUDA (``--device cuda``) the timings use CUDA events around synchronized regions, and
``--cuda-graphs`` compiles every variant with ``mode="reduce-overhead"``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time

import torch
import torch.nn as nn

from pop_fx.tools import bench_moe
from pop_fx.tools.autotuned import (auto_summary, choice_variants, load_average, pinned_choice, pinned_compile,
                                    print_auto)
from pop_fx.tools.model_copies import require_fully_rewritten, shallow_copy, structural_copy
from pop_fx.tools.timing import Cell, Clock, StepStamps

VARIANTS = ("dense-eager", "dense-inductor", "dense-fused", "sliced", "sliced-unfused", "pop", "pop-full",
            "pop-proxy", "pop-values")
DEFAULT_VARIANTS = ("dense-inductor", "dense-fused", "sliced", "pop")
POP_VARIANTS = ("pop", "pop-full", "pop-proxy", "pop-values")


def is_pop(variant: str) -> bool:
    return variant in POP_VARIANTS or pinned_choice(variant) is not None


def decode_op(config) -> str:
    """The op whose implementation ``pop[<choice>]`` pins under ``config`` (a dense FFN's decode)."""
    if config.candidate_proxy == "int8-values":
        return "pop::values_decode"
    return "pop::decode_seq" if config.scope == "sequence" else "pop::decode"


# ------------------------------------------------------------------------------------------------
# workloads and the baselines' models
# ------------------------------------------------------------------------------------------------


class GatedFFN(nn.Module):
    def __init__(self, d: int, f: int, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, f, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(f, d, bias=False, dtype=dtype)
        self.act_fn = nn.functional.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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


class FusedGatedFFN(nn.Module):
    """A gated FFN whose gate and up rows are one [2f, d] projection: ``down(act(g) * u)``, ``g, u = chunk(gate_up(x))``.

    The layout POP's decode reads (one GEMV over gate and up rows), given to the baselines so that a ratio
    measures pruning, not fusion."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: nn.Linear, act):
        super().__init__()
        f, d = gate.shape
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False, dtype=gate.dtype, device=gate.device)
        self.gate_up_proj.weight.data = torch.cat([gate.detach(), up.detach()]).contiguous()
        self.down_proj = down
        self.act_fn = act

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(g) * u)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _gated_sites(model: nn.Module):
    from pop_fx.sites import find_module_sites

    for s in find_module_sites(model)[0]:
        if s.kind in ("gated", "shared_expert") and tuple(s.inputs) in (("gate_proj", "up_proj"), ("w1", "w3")) \
                and getattr(s.module, "act_fn", None) is not None \
                and all(getattr(s.module, n).bias is None for n in s.inputs):
            yield s


def fused_copy(model: nn.Module) -> nn.Module:
    """``model`` with every bias-free gated FFN's gate and up fused into one projection (new [2f, d] weights;
    the rest shared)."""
    out = structural_copy(model)
    for s in list(_gated_sites(out)):
        g, u = (getattr(s.module, n).weight for n in s.inputs)
        _set_module(out, s.path, FusedGatedFFN(g, u, s.down, s.module.act_fn))
    return out


def sliced_copy(model: nn.Module, n_keep_of, fused: bool = False) -> nn.Module:
    """A copy of ``model`` whose every gated/plain FFN keeps only n_keep channels (the first ones: speed only).

    ``fused``: gated FFNs also get gate and up as one projection (``FusedGatedFFN``), as POP's decode reads them.
    """
    from pop_fx.sites import find_module_sites

    out = copy.deepcopy(model)
    sites, _ = find_module_sites(out)
    for s in sites:
        if s.kind not in ("gated", "plain", "fused_gated", "shared_expert"):
            continue
        k = n_keep_of(s.d_ff)
        for name, mod in list(s.module.named_children()):
            if not isinstance(mod, nn.Linear):
                continue
            if mod is s.down:
                new = nn.Linear(k, mod.out_features, bias=mod.bias is not None, dtype=mod.weight.dtype,
                                device=mod.weight.device)
                new.weight.data = mod.weight.data[:, :k].contiguous()
                if mod.bias is not None:
                    new.bias.data = mod.bias.data.clone()
            elif mod.out_features in (s.d_ff, 2 * s.d_ff):
                rows = k if mod.out_features == s.d_ff else 2 * k
                idx = torch.arange(k) if rows == k else torch.cat([torch.arange(k), s.d_ff + torch.arange(k)])
                new = nn.Linear(mod.in_features, rows, bias=mod.bias is not None, dtype=mod.weight.dtype,
                                device=mod.weight.device)
                new.weight.data = mod.weight.data[idx.to(mod.weight.device)].contiguous()
                if mod.bias is not None:
                    new.bias.data = mod.bias.data[idx.to(mod.weight.device)].clone()
            else:
                continue
            setattr(s.module, name, new)
        if hasattr(s.module, "intermediate_size"):
            s.module.intermediate_size = k
    return fused_copy(out) if fused else out


def proxy_config(config, gamma: float = 1.0, proxy: str = "int8"):
    """The ``pop-proxy`` variant's config: proxy-scored candidates over a band of width ``gamma``."""
    return config.replace(candidate_proxy=proxy, candidate_ratio=gamma)


def _build_variants(model, config, variants, n_keep_of, proxy_gamma: float = 1.0, proxy: str = "int8",
                    mode: str | None = None):
    import pop_fx

    built = {}
    inductor = dict(backend="inductor", mode=mode) if mode else dict(backend="inductor")
    for v in variants:
        torch.manual_seed(0)
        if v == "dense-eager":
            built[v] = model
        elif v in ("dense-inductor", "dense-fused", "sliced", "sliced-unfused"):
            m = {"dense-inductor": lambda: shallow_copy(model), "dense-fused": lambda: fused_copy(model),
                 "sliced": lambda: sliced_copy(model, n_keep_of, fused=True),
                 "sliced-unfused": lambda: sliced_copy(model, n_keep_of)}[v]()
            if v in ("dense-fused", "sliced"):
                # the baselines of the ratios compile as POP does (pop_fx.compile: regional, its Inductor
                # settings) with nothing pruned, so a ratio measures pruning, not how the graph was compiled
                built[v] = pop_fx.compile(m, config.replace(sparsity=0.0), mode=mode)
                continue
            m.compile(**inductor)
            built[v] = m
        elif v in POP_VARIANTS:
            cfg = {"pop": config, "pop-full": config.replace(candidate_ratio=2.0),
                   "pop-proxy": proxy_config(config, proxy_gamma, proxy),
                   "pop-values": proxy_config(config, 2.0, "int8-values")}[v]
            built[v] = pop_fx.compile(shallow_copy(model), cfg, mode=mode)
        elif pinned_choice(v):
            built[v] = pinned_compile(shallow_copy(model), config, decode_op(config), pinned_choice(v), mode)
        else:
            raise ValueError(f"variant={v!r} is invalid: allowed one of {list(VARIANTS)}")
    return built


def bench_ffn(d: int, f: int, k: int, config, *, batch: int = 1, prompt: int = 16, steps: int = 20,
              rounds: int = 5, dtype=torch.float32, variants=DEFAULT_VARIANTS, proxy_gamma: float = 1.0,
              proxy: str = "int8", device: str = "cpu", mode: str | None = None) -> dict[str, Cell]:
    """Per-layer decode-step time of a K-layer FFN stack (ms), each variant compiled once."""
    from pop_fx.partition import partition_sizes

    model = FFNStack(d, f, k, dtype).to(device).eval()
    n_keep_of = lambda ff: partition_sizes(ff, config.sparsity, config.candidate_ratio).n_keep  # noqa: E731
    built = _build_variants(model, config, variants, n_keep_of, proxy_gamma, proxy, mode)
    g = torch.Generator().manual_seed(0)
    x_pre = torch.randn(batch, prompt, d, generator=g).to(device, dtype)
    x_dec = torch.randn(batch, 1, d, generator=g).to(device, dtype)
    cells = {v: Cell(v) for v in variants}
    clock = Clock(device)
    with torch.no_grad():
        for v, m in built.items():  # compile + warm up: prefill then decode graphs
            for _ in range(3):
                m(x_pre)
                m(x_dec)
            if is_pop(v):
                require_fully_rewritten(v, m)
            t0 = clock.start()
            m(x_pre)
            cells[v].prefill_s = clock.seconds_since(t0)
        for _ in range(rounds):
            for v, m in built.items():
                m(x_pre)  # each round re-partitions, as a new prompt would
                t0 = clock.start()
                for _ in range(steps):
                    m(x_dec)
                cells[v].times.append(clock.seconds_since(t0) / steps / k * 1e3)
    _extra(built, cells)
    return cells


def bench_generate(model, tok, config, *, batch: int = 1, prompt: str | None = None, new_tokens: int = 32,
                   rounds: int = 3, variants=DEFAULT_VARIANTS, proxy_gamma: float = 1.0, proxy: str = "int8",
                   mode: str | None = None) -> dict[str, Cell]:
    """End-to-end greedy decode tokens/s (prefill excluded) of each variant."""
    from pop_fx.partition import partition_sizes

    n_keep_of = lambda ff: partition_sizes(ff, config.sparsity, config.candidate_ratio).n_keep  # noqa: E731
    built = _build_variants(model, config, variants, n_keep_of, proxy_gamma, proxy, mode)
    device = next(model.parameters()).device
    if tok is None:  # synthetic model: a fixed random prompt of 24 tokens
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, 24), generator=g)
        enc, pad = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    else:
        text = prompt or "In the beginning, God created the heavens and the earth. The earth was formless and empty."
        enc = dict(tok([text] * batch, return_tensors="pt"))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = {k: v.to(device) for k, v in enc.items()}
    kw = dict(do_sample=False, pad_token_id=pad)
    cells = {v: Cell(v) for v in variants}
    cuda = device.type == "cuda"

    def gen(m, n):
        """(prefill s, decode tokens/s) of one generate(): a logits processor stamps every step (after a
        device sync on CUDA), so the decode rate is taken between the first and the last token of the same
        call (prefill excluded)."""
        from transformers import LogitsProcessorList

        stamps = StepStamps(sync=cuda)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(**enc, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([stamps]), **kw)
        return stamps.t[0] - t0, stamps.decode_rate()

    with torch.no_grad():
        for v, m in built.items():  # compile every graph these lengths need
            gen(m, new_tokens)
            gen(m, new_tokens)
            if is_pop(v):
                require_fully_rewritten(v, m)
        for _ in range(rounds):
            for v, m in built.items():
                prefill_s, rate = gen(m, new_tokens)
                cells[v].prefill_s = prefill_s
                cells[v].times.append(rate)  # tokens/s
    _extra(built, cells)
    return cells


def _extra(built, cells):
    import pop_fx

    for v in built:
        if is_pop(v):
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
    parser.add_argument("--shape", default="1b", choices=["1b", "smollm2", "7b"],
                        help="--ffn-only shape: 1b = d 2048, d_ff 5632; smollm2 = d 576, d_ff 1536; 7b = d 4096, d_ff 14336")
    parser.add_argument("--layers", type=int, default=8, help="--ffn-only: FFN layers in the stack (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens per timed generate() (end to end; --ffn-only times 20 decode steps) "
                             "(default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over all variants; "
                        "the median is reported (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile every variant with mode='reduce-overhead'")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                        help="PopConfig.kernels of the POP variants (CUDA decode kernels; default %(default)s)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
                        + ", and pop[<choice>] (pop with its decode op pinned to one autotuning choice)")
    parser.add_argument("--choices", action="store_true",
                        help="add pop[<choice>] for every choice of the cell's decode op beside pop (kernels='auto'); "
                             "on by default with --full")
    parser.add_argument("--proxy-gamma", type=float, default=1.0, help="candidate_ratio of the pop-proxy variant (default %(default)s)")
    parser.add_argument("--proxy", default="int8", choices=["int8", "int3", "int8-gate", "int8-values"],
                        help="candidate_proxy of the pop-proxy variant (default %(default)s)")
    parser.add_argument("--pop-proxy", default="none", choices=["none", "int8", "int3", "int8-gate", "int8-values"],
                        help="candidate_proxy of the pop variant and its pop[<choice>] variants, e.g. int8-values with "
                             "--candidate-ratio 2 and --choices times that method's lowerings (default none: POP's "
                             "exact candidates)")
    parser.add_argument("--full", action="store_true",
                        help="every cell of docs/benchmarks.md's speed table (1B-shaped FFN stack: fp32/bf16/fp16 at batch 1, "
                             "fp32/bf16 at batch 8; SmolLM2 end to end: fp32 and bf16 at batch 1, scope='sequence' "
                             "at batch 8), r=0.5, γ=0.1")
    bench_moe.add_arguments(parser)


def _full_cells(args, config):
    """(label, args overrides, config, batch, dtype) of every --full cell."""
    seq = config.replace(scope="sequence")
    return [
        ("1B FFN layer, fp32, batch 1", dict(ffn_only=True, shape="1b"), config, 1, torch.float32),
        ("1B FFN layer, bf16, batch 1", dict(ffn_only=True, shape="1b"), config, 1, torch.bfloat16),
        ("1B FFN layer, fp16, batch 1", dict(ffn_only=True, shape="1b"), config, 1, torch.float16),
        ("1B FFN layer, fp32, batch 8", dict(ffn_only=True, shape="1b"), config, 8, torch.float32),
        ("1B FFN layer, bf16, batch 8", dict(ffn_only=True, shape="1b"), config, 8, torch.bfloat16),
        ("SmolLM2, fp32, batch 1", dict(ffn_only=False), config, 1, torch.float32),
        ("SmolLM2, bf16, batch 1", dict(ffn_only=False), config, 1, torch.bfloat16),
        ("SmolLM2, fp32, batch 8, scope=sequence", dict(ffn_only=False), seq, 8, torch.float32),
    ]


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.cli import config_from_args
    from pop_fx.tools.models import parse_dtype

    torch.set_num_threads(args.threads)
    config = config_from_args(args).replace(kernels=args.kernels,
                                            candidate_proxy=None if args.pop_proxy == "none" else args.pop_proxy)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for v in variants:
        if v not in VARIANTS and not pinned_choice(v):
            raise ValueError(f"--variants: {v!r} is invalid: allowed {list(VARIANTS)} or pop[<choice>]")
    if args.full:
        args.choices = True
    if args.full:
        tables = []
        for label, over, cfg, b, dt in _full_cells(args, config):
            cell_args = argparse.Namespace(**{**vars(args), **over})
            if not args.json:
                print(f"== {label}")
            tables.append(dict(label=label, **_run_cell(cell_args, cfg, b, dt, variants)))
    else:
        tables = [_run_cell(args, config, args.batch, parse_dtype(args.dtype), variants)]
    if args.json:
        print(json.dumps(tables if args.full else tables[0], indent=2))
    return 0


def _run_cell(args, config, batch, dtype, variants) -> dict:
    # The variants are compiled copies of one model class, and Dynamo's recompile limit counts the graphs of
    # all of them against one code object: past it a variant would silently run uncompiled (and POP
    # unpruned). Give each variant the default allowance, and refuse to report a run that still hit it.
    from pop_fx.api import recompile_limit_hits

    if getattr(args, "choices", False) and "pop" in variants and not getattr(args, "moe", False):
        device = getattr(args, "device", "cpu")
        variants = tuple(variants) + tuple(v for v in choice_variants(decode_op(config), device) if v not in variants)
    torch._dynamo.reset()
    hits = recompile_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * len(variants)):
        out = _measure_cell(args, config, batch, dtype, variants)
    if recompile_limit_hits() > hits:
        raise RuntimeError("pop-fx bench: Dynamo's recompile limit was hit, so some variant ran uncompiled; "
                           "the timings are void (run fewer variants per process)")
    return out


SHAPES = {"1b": (2048, 5632), "smollm2": (576, 1536), "7b": (4096, 14336)}


def _measure_cell(args, config, batch, dtype, variants) -> dict:
    from pop_fx import autotune
    from pop_fx.tools.models import load_model

    device = getattr(args, "device", "cpu")
    mode = "reduce-overhead" if getattr(args, "cuda_graphs", False) else None
    autotune.clear()
    if getattr(args, "moe", False):
        return bench_moe.run_moe(args, config, batch, dtype)
    if args.ffn_only:
        d, f = SHAPES[args.shape]
        cells = bench_ffn(d, f, args.layers, config, batch=batch, rounds=args.rounds, dtype=dtype, variants=variants,
                          proxy_gamma=args.proxy_gamma, proxy=args.proxy, device=device, mode=mode)
        unit, higher_better, what = "ms/layer", False, f"one FFN layer d={d} d_ff={f} (stack of {args.layers})"
    else:
        if args.model == "synthetic-1b":
            model, tok = synthetic_1b(dtype), None
        else:
            model, tok = load_model(args.model, dtype)
        model = model.to(device)
        cells = bench_generate(model, tok, config, batch=batch, new_tokens=args.new_tokens, rounds=args.rounds,
                               variants=variants, proxy_gamma=args.proxy_gamma, proxy=args.proxy, mode=mode)
        unit, higher_better, what = "tokens/s", True, f"{args.model} generate() decode"
    base = cells.get("dense-fused") or cells.get("dense-inductor")
    ideal = cells.get("sliced") or cells.get("sliced-unfused")

    def speedup(c, ref):
        if ref is None:
            return float("nan")
        return c.median / ref.median if higher_better else ref.median / c.median

    rows = [dict(variant=v, median=c.median, unit=unit, samples=c.times, prefill_s=c.prefill_s,
                 speedup_vs_dense=speedup(c, base), speedup_vs_ideal=speedup(c, ideal),
                 extra_mib=c.extra_bytes / 2**20) for v, c in cells.items()]
    auto = auto_summary(cells, [d for d in autotune.decisions(config) if not d.how.endswith("pinned")], higher_better)
    meta = dict(what=what, config=config.as_dict(), batch=batch, dtype=str(dtype), threads=args.threads,
                device=device, torch=torch.__version__, dense=base.variant if base else None,
                ideal=ideal.variant if ideal else None, load=load_average(), auto=auto)
    if args.ffn_only and base is not None:  # the dense baseline's weight bandwidth: how far from memory speed
        meta["dense_gb_s"] = 3 * d * f * torch.finfo(dtype).bits / 8 / (base.median * 1e-3) / 1e9
    if not args.json:
        print(f"{what}, batch {batch}, {dtype}, {device}, {args.threads} threads, r={config.sparsity} "
              f"γ={config.candidate_ratio} scope={config.scope}")
        print(f"{'variant':16s} {unit:>10s} {'× dense':>9s} {'× ideal':>9s} {'prefill s':>10s} {'extra MiB':>10s}")
        for r in rows:
            print(f"{r['variant']:16s} {r['median']:10.3f} {r['speedup_vs_dense']:9.3f} "
                  f"{r['speedup_vs_ideal']:9.3f} {r['prefill_s']:10.4f} {r['extra_mib']:10.1f}")
        print(f"(× columns: speed relative to {meta['dense']} and {meta['ideal']}, > 1 is faster)")
        print_auto(meta)
    gc.collect()
    return dict(meta=meta, rows=rows)
