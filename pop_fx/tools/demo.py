"""Dense vs POP greedy generation on SmolLM2 through torch.compile, with token agreement and speed.

By default three columns side by side: dense, a setting that keeps SmolLM2's text sensible (``--also``,
chosen from the measured frontier: docs/choosing.md) and the requested ``--sparsity`` (0.5),
so the quality–speed trade-off is on one screen. Every column runs under ``backend="pop"``, dense as
``sparsity=0`` (the same autotuned decode linears as POP; each compiled in place, warmed up once, then timed),
so tokens/s compares like with like; ``--no-compile`` shows the eager reference. A line per phase, with the
seconds elapsed, goes to stderr as it happens (compiling a 30-layer model on 2 cores takes a while).
"""

from __future__ import annotations

import argparse
import json

import torch

DEFAULT_PROMPTS = ("The capital of France is",)
MODEL_HELP = ("'smollm2', or a local HF folder or .gguf file that has a tokenizer (the demo prints text; the tiny "
              "random families have none) (default %(default)s)")

# From `pop-fx frontier --quick` on SmolLM2 (docs/choosing.md, Inductor, 2 threads): the fastest setting within
# 1.25x dense perplexity on 2026-12-01 was the int8-values method at r=0.5 (perplexity 1.22x, agreement 0.77), where
# POP at r=0.5 is 4.1x and 0.48 (its text loops). Its speed against dense depends on the machine's memory.
SENSIBLE = "0.5:2:int8-values"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS), help="prompts (default: one built-in)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default %(default)s)")
    parser.add_argument("--also", default=SENSIBLE, help="one more setting shown beside --sparsity, as r:γ or r:γ:candidate_proxy "
                        "(default %(default)s, sensible text on SmolLM2; 'none' to skip it)")
    parser.add_argument("--no-compile", action="store_true", help="run POP through the eager reference instead of backend='pop'")


def check_model(name: str) -> None:
    """Refuse, before anything is loaded, a model the demo cannot show: the tiny random families have no
    tokenizer (``pop-fx inspect``, ``bench`` and ``eval`` take them)."""
    from pop_fx.tools.models import TINY_FAMILIES, TINY_VLM_FAMILIES

    if str(name) in TINY_FAMILIES + TINY_VLM_FAMILIES:
        raise ValueError(f"--model={name!r} is a tiny random model without a tokenizer, and the demo prints text: "
                         f"allowed 'smollm2' or a local Hugging Face folder / .gguf file with a tokenizer "
                         f"(`pop-fx inspect {name}` shows what POP does to it)")


def parse_also(text: str, base):
    """``"r:γ:proxy"``, ``"r:γ"`` or ``"r"`` (the rest from ``base``) -> the extra PopConfig, or None for ``"none"``."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    parts = str(text).split(":")
    try:
        if len(parts) > 3:
            raise ValueError
        fields = dict(sparsity=float(parts[0]))
        if len(parts) > 1 and parts[1]:
            fields["candidate_ratio"] = float(parts[1])
        if len(parts) > 2:
            fields["candidate_proxy"] = parts[2] or None
        return base.replace(**fields)
    except ValueError as e:
        if "invalid" in str(e) or "out of range" in str(e):
            raise
        raise ValueError(f"--also={text!r} is invalid: allowed r:γ (e.g. 0.2:0.1), r:γ:candidate_proxy "
                         f"(e.g. 0.5:2:int8-values) or 'none'") from None


def setting_label(cfg) -> str:
    """``r=0.5 γ=2 int8-values``: a setting as the demo prints it."""
    proxy = f" {cfg.candidate_proxy}" if cfg.candidate_proxy else ""
    return f"r={cfg.sparsity:g} γ={cfg.candidate_ratio:g}{proxy}"


def format_rows(rows: list[dict]) -> list[str]:
    """The demo's per-prompt lines: dense, then each setting, names padded to the longest so the brackets align."""
    width = max([len("dense")] + [len(f"POP {s['label']}") for r in rows for s in r["settings"]])
    lines = []
    for r in rows:
        lines += ["", f"prompt: {r['prompt']!r}",
                  f"  {'dense':<{width}} [{r['dense_tokens_per_s']:5.1f} tok/s]: {r['dense']!r}"]
        for s in r["settings"]:
            name = f"POP {s['label']}"
            lines.append(f"  {name:<{width}} [{s['tokens_per_s']:5.1f} tok/s, "
                         f"{s['tokens_per_s'] / r['dense_tokens_per_s']:.2f}x dense; agreement {s['agreement']:.2f}, "
                         f"greedy tokens equal {s['greedy_tokens_equal']:.2f}]: {s['text']!r}")
    return lines


def generate_timed(model, tok, prompt: str, n: int, warmup: bool = False) -> tuple[torch.Tensor, float]:
    """(ids, decode tokens/s): the rate between the first and the last new token (prefill excluded, as in
    ``pop-fx bench``; POP's prefill also builds its layouts)."""
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if warmup:  # compile the prefill and decode graphs outside the timed run
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        stamps = StepStamps()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]))
    return out[0], stamps.decode_rate()


def compiled_runs(model, tok, prompts, n, configs, log=None):
    """[(ids, tok/s) per prompt] for dense (backend="pop", sparsity 0: the lowering POP gets), then for each
    config (backend="pop"), and the last config's report."""
    import contextlib

    import pop_fx

    phase = log.phase if log is not None else (lambda msg: contextlib.nullcontext())
    torch._dynamo.reset()
    pop_fx.compile(model, sparsity=0)
    with phase("compiling dense (backend='pop', sparsity 0: prefill and decode graphs) and generating"):
        runs = [[generate_timed(model, tok, p, n, warmup=True) for p in prompts]]
    pop_fx.decompile(model)
    report = None
    for cfg in configs:
        torch._dynamo.reset()
        pop_fx.compile(model, cfg)
        try:
            with phase(f"compiling POP {setting_label(cfg)} (backend='pop') and generating"):
                runs.append([generate_timed(model, tok, p, n, warmup=True) for p in prompts])
            report = pop_fx.report(model)
        finally:
            pop_fx.decompile(model)
    return runs, report


def pop_context(model, config):
    """How POP is applied in the demo (the eager reference for now)."""
    from pop_fx import reference

    return reference.pruned(model, config)


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.cli import config_from_args
    from pop_fx.tools.progress import Progress

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 1")
    config = config_from_args(args)
    also = parse_also(args.also, config)
    check_model(args.model)
    configs = [c for c in (also, config) if c is not None]
    log = Progress()
    log(f"pop-fx demo: loading {args.model} (dense, then POP at " +
        ", ".join(setting_label(c) for c in configs) + ")")
    from pop_fx.tools.agreement import next_token_agreement
    from pop_fx.tools.models import SMOLLM2_DIR, cache_root, load_model

    if args.model == "smollm2" and not (cache_root() / SMOLLM2_DIR / "config.json").is_file():
        log(f"first use: converting SmolLM2's GGUF once to {cache_root() / SMOLLM2_DIR} (about a minute; later "
            f"runs load in seconds)")
    with log.phase(f"loading {args.model}"):
        model, tok = load_model(args.model, args.dtype)
    if tok is None:
        raise ValueError(f"--model={args.model!r} has no tokenizer: allowed 'smollm2' or a folder with a tokenizer")
    report = None
    if args.no_compile:
        runs = []
        with log.phase("generating (eager; POP through the eager reference)"):
            runs.append([generate_timed(model, tok, p, args.max_new_tokens) for p in args.prompts])
            for cfg in configs:
                with pop_context(model, cfg):
                    runs.append([generate_timed(model, tok, p, args.max_new_tokens) for p in args.prompts])
    else:
        runs, report = compiled_runs(model, tok, args.prompts, args.max_new_tokens, configs, log)
    rows = []
    with log.phase("next-token agreement with dense (decode mode, eager reference)"):
        for i, prompt in enumerate(args.prompts):
            dense_ids, dense_tps = runs[0][i]
            n_prompt = len(tok(prompt).input_ids)
            row = dict(prompt=prompt, dense=tok.decode(dense_ids[n_prompt:], skip_special_tokens=True),
                       dense_tokens_per_s=dense_tps, settings=[])
            for cfg, run_ in zip(configs, runs[1:]):
                pop_ids, pop_tps = run_[i]
                # Teacher-forced on the dense continuation, every step through POP's decode path.
                agree = next_token_agreement(model, dense_ids[None, :-1], n_prompt, lambda: pop_context(model, cfg))
                row["settings"].append(dict(
                    sparsity=cfg.sparsity, candidate_ratio=cfg.candidate_ratio, candidate_proxy=cfg.candidate_proxy,
                    label=setting_label(cfg),
                    text=tok.decode(pop_ids[n_prompt:], skip_special_tokens=True), tokens_per_s=pop_tps,
                    greedy_tokens_equal=(dense_ids[n_prompt:] == pop_ids[n_prompt:]).float().mean().item(),
                    agreement=agree))
            main = row["settings"][-1]  # --sparsity's setting: the keys earlier versions printed
            row.update(pop=main["text"], agreement=main["agreement"], greedy_tokens_equal=main["greedy_tokens_equal"],
                       pop_tokens_per_s=main["tokens_per_s"])
            rows.append(row)
    log(f"done in {log.elapsed():.0f} s")
    if args.json:
        print(json.dumps({"config": config.as_dict(), "also": also.as_dict() if also else None, "model": args.model,
                          "compiled": not args.no_compile, "sites": report.counts() if report else None,
                          "results": rows}, indent=2))
        return 0
    how = "eager reference" if args.no_compile else "backend='pop' (Inductor), dense as sparsity 0"
    print(f"\nmodel {args.model}, greedy, {args.max_new_tokens} new tokens ({how})")
    if report is not None:
        print(f"POP sites: {report.counts()}")
    if also is not None:
        print(f"{setting_label(also)}: a setting whose text stays sensible on SmolLM2 "
              f"(docs/choosing.md; `pop-fx frontier` measures yours)")
    for line in format_rows(rows):
        print(line)
    print("\ntok/s: decode tokens/s between the first and last new token (prefill excluded; compiled: one run after a "
          "warm-up);"
          "\nagreement: next-token agreement with dense, teacher-forced on dense's continuation, decode mode")
    return 0
