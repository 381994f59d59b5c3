"""`pop-fx bench --moe`: decode speed of routed experts — dense Inductor vs POP vs every expert sliced.

A synthetic MoE shaped like a current small MoE (random weights: speed does not depend on them), built from
transformers' own Qwen3-MoE modules so that the dense baselines run transformers' experts implementations:

* ``--moe-shape olmoe``  d_model 2048, 64 experts of d_ff 1024, top-8 (OLMoE-1B-7B's layer);
* ``--moe-shape qwen3``  d_model 2048, 128 experts of d_ff 768, top-8 (Qwen3-30B-A3B's layer).

Variants (each its own compiled copy over the same Parameters, except ``sliced``):

* ``dense-grouped`` — stock Inductor, experts implementation ``grouped_mm`` (fp32 on CPU: transformers'
  ``grouped_mm_fallback``, one ``mm`` per expert a step routes to);
* ``dense-batched`` — stock Inductor, ``batched_mm`` (each pair's expert matrices gathered, then ``bmm``);
* ``sliced``        — every expert physically cut to the n_keep channels POP computes per step, ``grouped_mm``
                      (the ideal: POP's bytes at zero overhead);
* ``sliced-batched`` — the same cut experts, ``batched_mm`` (at batch 1 Inductor reads each pair's expert in
                      place, faster than ``grouped_mm`` in bf16); the ideal is the faster of the two;
* ``pop``           — ``backend="pop"``: ``pop::experts_decode`` over the per-expert R ∪ C layouts, its GEMVs
                      chosen by Inductor's autotuner at compile time (``kernels="auto"``);
* ``pop[<gemv>]``   — the same with the GEMVs pinned to one choice (``grouped_mm``, ``bmm``, ``pair_loop``:
                      ``experts_decode.GEMVS``); ``--choices`` adds every one that serves the cell.

"× dense" is against the faster dense variant. Two workloads: the default times one MoE layer (a residual
stack of K router + experts blocks, weights far beyond the caches; routing changes every step because the
input does), ``--moe-e2e`` a K-layer Qwen3-MoE CausalLM's ``generate()`` decode tokens/s (prefill excluded).
Variants are timed in interleaved rounds; medians are reported.
"""

from __future__ import annotations

import copy
import gc
import time

import torch
import torch.nn as nn

from pop_fx.tools.model_copies import require_fully_rewritten, structural_copy
from pop_fx.tools.timing import Cell, Clock, StepStamps

MOE_SHAPES = {"olmoe": (2048, 64, 1024, 8), "qwen3": (2048, 128, 768, 8), "tiny": (64, 8, 48, 2)}
"""d_model, experts, d_ff per expert, top-k (tiny: for tests)"""
MOE_VARIANTS = ("dense-grouped", "dense-batched", "sliced", "sliced-batched", "pop")


def moe_config(shape: str, layers: int, vocab: int = 4096):
    from transformers import Qwen3MoeConfig

    d, E, f, k = MOE_SHAPES[shape]
    heads = 16 if d >= 2048 else 4
    return Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, intermediate_size=4 * f, num_experts=E,
                          num_experts_per_tok=k, norm_topk_prob=True, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=4, head_dim=d // heads, vocab_size=vocab,
                          max_position_embeddings=512, decoder_sparse_step=1, mlp_only_layers=[])


def _fill(module: nn.Module, dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for p in module.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(std=p.shape[-1] ** -0.5)
    return module.to(dtype).eval()


class MoEStack(nn.Module):
    """K Qwen3-MoE blocks (router + experts) with residual adds: the MoE layer without attention."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        self.config = config
        self.layers = nn.ModuleList(Qwen3MoeSparseMoeBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, inputs_embeds):  # the name tells the passes batch from tokens
        x = inputs_embeds
        for layer in self.layers:
            x = x + layer(x)
        return x


def sliced_experts_copy(model: nn.Module, n_keep: int) -> nn.Module:
    """A copy of ``model`` whose every experts module keeps n_keep channels per expert (the first ones)."""
    out = copy.deepcopy(model) if not isinstance(model, MoEStack) else structural_copy(model)
    for m in out.modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gu, torch.Tensor) and gu.dim() == 3:
            f = dn.shape[-1]
            rows = torch.cat([torch.arange(n_keep), f + torch.arange(n_keep)])
            m.gate_up_proj = nn.Parameter(gu.data[:, rows].contiguous(), requires_grad=False)
            m.down_proj = nn.Parameter(dn.data[:, :, :n_keep].contiguous(), requires_grad=False)
            if hasattr(m, "intermediate_dim"):
                m.intermediate_dim = n_keep
    return out


def _with_impl(model: nn.Module, impl: str) -> nn.Module:
    """A copy over the same Parameters with its own config, set to experts implementation ``impl``."""
    out = structural_copy(model)
    cfg = copy.copy(out.config)
    cfg._experts_implementation = impl
    for m in out.modules():
        if hasattr(m, "config"):
            m.config = cfg
    return out


def build_moe_variants(model: nn.Module, config, variants, n_keep: int) -> dict[str, nn.Module]:
    import pop_fx

    built, cut = {}, []
    for v in variants:
        if v in ("dense-grouped", "dense-batched"):
            m = _with_impl(model, v.split("-")[1] + "_mm")
            m.compile(backend="inductor")
        elif v in ("sliced", "sliced-batched"):
            if not cut:  # one cut copy, shared by both implementations
                cut.append(sliced_experts_copy(model, n_keep))
            m = _with_impl(cut[0], "batched_mm" if v == "sliced-batched" else "grouped_mm")
            m.compile(backend="inductor")
        elif v == "pop":
            m = pop_fx.compile(_with_impl(model, "grouped_mm"), config)
        elif _pinned(v):
            from pop_fx.tools.autotuned import pinned_compile

            m = pinned_compile(_with_impl(model, "grouped_mm"), config, "pop::experts_decode", _pinned(v))
        else:
            raise ValueError(f"variant={v!r} is invalid: allowed one of {list(MOE_VARIANTS)}")
        built[v] = m
    return built


def _pinned(v: str) -> str | None:
    from pop_fx.tools.autotuned import pinned_choice

    return pinned_choice(v)


def choice_variants(shape: str, batch: int, device: str = "cpu") -> tuple[str, ...]:
    """``pop[<gemv>]`` for every experts GEMV that serves a step of ``batch`` tokens (``pair_loop``: B·k pairs at
    most ``PAIR_LOOP_MAX``)."""
    from pop_fx.ops.experts_decode import PAIR_LOOP_MAX
    from pop_fx.tools.autotuned import choice_variants as variants

    k = MOE_SHAPES[shape][3]
    return variants("pop::experts_decode", device, lambda n: n != "pair_loop" or batch * k <= PAIR_LOOP_MAX)


def _layout_bytes(m: nn.Module) -> int:
    import pop_fx

    return pop_fx.report(m).extra_bytes


def bench_moe_layer(shape: str, layers: int, config, *, batch: int = 1, prompt: int = 16, steps: int = 10,
                    rounds: int = 5, dtype=torch.float32, variants=MOE_VARIANTS) -> dict[str, Cell]:
    """Per-layer decode-step time (ms) of a K-layer router + experts stack."""
    from pop_fx.partition import partition_sizes

    cfg = moe_config(shape, layers)
    model = _fill(MoEStack(cfg), dtype)
    n_keep = partition_sizes(cfg.moe_intermediate_size, config.sparsity, config.candidate_ratio).n_keep
    built = build_moe_variants(model, config, variants, n_keep)
    g = torch.Generator().manual_seed(0)
    x_pre = torch.randn(batch, prompt, cfg.hidden_size, generator=g).to(dtype)
    # A new input every step, so the router picks other experts (as in generation): no expert stays in cache.
    x_dec = [torch.randn(batch, 1, cfg.hidden_size, generator=g).to(dtype) for _ in range(steps)]
    cells = {v: Cell(v) for v in variants}
    clock = Clock("cpu")
    with torch.no_grad():
        for v, m in built.items():  # compile + warm up: prefill then decode graphs
            for _ in range(2):
                m(x_pre)
                m(x_dec[0])
            if v == "pop" or _pinned(v):
                require_fully_rewritten(v, m)
                cells[v].extra_bytes = _layout_bytes(m)
            t0 = clock.start()
            m(x_pre)
            cells[v].prefill_s = clock.seconds_since(t0)
        for _ in range(rounds):
            for v, m in built.items():
                m(x_pre)  # each round re-partitions, as a new prompt would
                t0 = clock.start()
                for x in x_dec:
                    m(x)
                cells[v].times.append(clock.seconds_since(t0) / steps / layers * 1e3)
    return cells


def bench_moe_generate(shape: str, layers: int, config, *, batch: int = 1, new_tokens: int = 16, rounds: int = 3,
                       dtype=torch.float32, variants=MOE_VARIANTS) -> dict[str, Cell]:
    """End-to-end greedy decode tokens/s (prefill excluded) of a K-layer Qwen3-MoE CausalLM."""
    from transformers import LogitsProcessorList, Qwen3MoeForCausalLM

    from pop_fx.partition import partition_sizes

    cfg = moe_config(shape, layers)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = _fill(model.to_empty(device="cpu"), dtype)
    model.config._experts_implementation = "grouped_mm"
    n_keep = partition_sizes(cfg.moe_intermediate_size, config.sparsity, config.candidate_ratio).n_keep
    built = build_moe_variants(model, config, variants, n_keep)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, 24), generator=g)
    enc = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    cells = {v: Cell(v) for v in variants}

    def gen(m):
        stamps = StepStamps(sync=False)
        t0 = time.perf_counter()
        m.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([stamps]))
        return stamps.t[0] - t0, stamps.decode_rate()

    with torch.no_grad():
        for v, m in built.items():
            gen(m)
            gen(m)
            if v == "pop" or _pinned(v):
                require_fully_rewritten(v, m)
                cells[v].extra_bytes = _layout_bytes(m)
        for _ in range(rounds):
            for v, m in built.items():
                cells[v].prefill_s, rate = gen(m)
                cells[v].times.append(rate)
    return cells


def add_arguments(parser) -> None:
    parser.add_argument("--moe", action="store_true", help="routed experts: a synthetic MoE (see --moe-shape) instead "
                                                           "of dense FFNs; variants " + ",".join(MOE_VARIANTS))
    parser.add_argument("--moe-shape", default="olmoe", choices=sorted(MOE_SHAPES),
                        help="--moe: olmoe = d 2048, 64 experts of d_ff 1024, top-8; qwen3 = d 2048, 128 experts of "
                             "768, top-8 (default %(default)s)")
    parser.add_argument("--moe-e2e", action="store_true", help="--moe: generate() of a --layers-layer Qwen3-MoE "
                                                               "CausalLM instead of the layer stack")


def run_moe(args, config, batch: int, dtype) -> dict:
    """One --moe cell: the table and its meta (as bench's other cells)."""
    from pop_fx import autotune
    from pop_fx.tools.autotuned import auto_summary, load_average, print_auto

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not all(v in MOE_VARIANTS or _pinned(v) for v in variants) or not any(v in MOE_VARIANTS for v in variants):
        variants = MOE_VARIANTS
    if getattr(args, "choices", False) and "pop" in variants:
        variants = variants + tuple(v for v in choice_variants(args.moe_shape, batch) if v not in variants)
    layers = args.layers if args.layers != 8 else 2  # bench's default 8 would not fit: 2 layers of ~1.6 GB
    if args.moe_e2e:
        cells = bench_moe_generate(args.moe_shape, layers, config, batch=batch, new_tokens=args.new_tokens,
                                   rounds=args.rounds, dtype=dtype, variants=variants)
        unit, higher = "tokens/s", True
    else:
        cells = bench_moe_layer(args.moe_shape, layers, config, batch=batch, rounds=args.rounds, dtype=dtype,
                                variants=variants)
        unit, higher = "ms/layer", False
    dense = [cells[v] for v in ("dense-grouped", "dense-batched") if v in cells]
    base = (max if higher else min)(dense, key=lambda c: c.median) if dense else None
    cut = [cells[v] for v in ("sliced", "sliced-batched") if v in cells]
    ideal = (max if higher else min)(cut, key=lambda c: c.median) if cut else None

    def ratio(c, ref):
        if ref is None:
            return float("nan")
        return c.median / ref.median if higher else ref.median / c.median

    d, E, f, k = MOE_SHAPES[args.moe_shape]
    what = (f"{'generate() decode' if args.moe_e2e else 'one MoE layer'}: d={d}, {E} experts of d_ff {f}, top-{k} "
            f"({layers} layers)")
    rows = [dict(variant=v, median=c.median, unit=unit, samples=c.times, prefill_s=c.prefill_s,
                 speedup_vs_dense=ratio(c, base), speedup_vs_ideal=ratio(c, ideal), extra_mib=c.extra_bytes / 2**20)
            for v, c in cells.items()]
    auto = auto_summary(cells, [d for d in autotune.decisions(config) if not d.how.endswith("pinned")], higher)
    meta = dict(what=what, config=config.as_dict(), batch=batch, dtype=str(dtype), threads=args.threads,
                device="cpu", torch=torch.__version__, dense=base.variant if base else None,
                ideal=ideal.variant if ideal else None, load=load_average(), auto=auto)
    if not args.json:
        print(f"{what}, batch {batch}, {dtype}, {args.threads} threads, r={config.sparsity} γ={config.candidate_ratio}")
        print(f"{'variant':16s} {unit:>10s} {'× dense':>9s} {'× ideal':>9s} {'prefill s':>10s} {'extra MiB':>10s}")
        for r in rows:
            print(f"{r['variant']:16s} {r['median']:10.3f} {r['speedup_vs_dense']:9.3f} "
                  f"{r['speedup_vs_ideal']:9.3f} {r['prefill_s']:10.4f} {r['extra_mib']:10.1f}")
        print(f"(× columns: speed relative to {meta['dense']} and {meta['ideal']}, > 1 is faster; samples per "
              f"round: {unit})")
        print_auto(meta)
    gc.collect()
    return dict(meta=meta, rows=rows)


__all__ = ["MOE_SHAPES", "MOE_VARIANTS", "MoEStack", "choice_variants", "bench_moe_generate", "bench_moe_layer", "moe_config",
           "run_moe", "sliced_experts_copy"]
