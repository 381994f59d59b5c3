"""``pop-fx frontier``: its flags and its run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pop_fx.tools.frontier.cache import cache_root
from pop_fx.tools.frontier.result import FrontierResult, frontier
from pop_fx.tools.frontier.settings import DEFAULT, QUICK, parse_budget, parse_settings

SHARED_FLAGS = ("model", "prefill", "dtype", "json")
"""The shared flags (pop_fx.tools.cli) frontier reads: a setting's r and γ come from --settings or from
--methods × --sparsities, and the scope from --batch-size."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pop-fx frontier`` flags, beside the shared ones of ``SHARED_FLAGS``."""
    from pop_fx.tools.evaluation.cli import float_list

    g = parser.add_argument_group("frontier")
    g.add_argument("--budget", default="1.10", help="quality budget: max perplexity ratio to dense (1.10, ppl:1.10) "
                   "or min next-token agreement (0.9, agreement:0.9) (default %(default)s)")
    g.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: "
                   f"{len(QUICK['settings'].split(','))} settings, {QUICK['windows']} windows of "
                   f"{QUICK['prompt_len']}+{QUICK['cont_len']} tokens, {QUICK['rounds']} speed rounds")
    g.add_argument("--settings", default=None, help="comma-separated method@r, e.g. static@0.3,pop-0.1@0.3,full@0.5 "
                   "(default: --methods at every --sparsities)")
    g.add_argument("--methods", default=None, help="comma-separated: static, pop-<γ>, full, proxy-<γ>, "
                   f"proxy-int3-<γ>, proxy-gate-<γ> (default {','.join(DEFAULT['methods'])})")
    g.add_argument("--sparsities", "--sparsity", dest="sparsities", type=float_list, default=None,
                   help=f"FFN sparsities r, comma-separated, each measured with every --methods "
                        f"(default {','.join(map(str, DEFAULT['sparsities']))})")
    g.add_argument("--text", default=None, help="text file (default: the World English Bible sample packaged with "
                   "pop-fx, pop_fx/data/web_bible_sample.txt)")
    g.add_argument("--windows", type=int, default=None, help=f"evaluation windows (default {DEFAULT['windows']})")
    g.add_argument("--prompt-len", type=int, default=None, help=f"prompt tokens per window (default {DEFAULT['prompt_len']})")
    g.add_argument("--cont-len", type=int, default=None, help=f"decode steps per window (default {DEFAULT['cont_len']})")
    g.add_argument("--batch-size", type=int, default=16, help="windows per batch (> 1: scope='sequence', each window "
                   "its own partition) (default %(default)s)")
    g.add_argument("--new-tokens", type=int, default=None, help=f"tokens per timed generate() (default {DEFAULT['new_tokens']})")
    g.add_argument("--rounds", type=int, default=None, help=f"interleaved timing rounds (default {DEFAULT['rounds']})")
    g.add_argument("--lowering", choices=["inductor", "eager"], default="inductor",
                   help="compile dense and POP through Inductor (the speed a user gets) or eager (fast, for tests)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", default=None, help="directory for frontier.json, frontier.md and frontier.png")
    g.add_argument("--replot", default=None, metavar="FRONTIER_JSON", help="measure nothing: read an earlier "
                   "run's frontier.json, apply --budget, print and (with --out) write again")
    g.add_argument("--no-cache", action="store_true", help="measure everything again (and do not store)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar and no phase lines")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.evaluation.text import ByteTokenizer, read_text
    from pop_fx.tools.models import load_model
    from pop_fx.tools.progress import Progress

    log = Progress(enabled=not args.no_progress)
    budget = parse_budget(args.budget)
    preset = QUICK if args.quick else DEFAULT
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, DEFAULT.get(name))  # noqa: E731
    if args.settings or args.methods or args.sparsities:
        methods = args.methods.split(",") if args.methods else list(DEFAULT["methods"])
        settings = parse_settings(args.settings, methods, args.sparsities or DEFAULT["sparsities"])
    else:
        settings = parse_settings(preset.get("settings"), DEFAULT["methods"], DEFAULT["sparsities"])
    n = dict(windows=pick("windows"), prompt_len=pick("prompt_len"), cont_len=pick("cont_len"),
             new_tokens=pick("new_tokens"), rounds=pick("rounds"), batch_size=args.batch_size)
    for k, v in n.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{k.replace('_', '-')}={v!r} is invalid: allowed an integer >= 1")
    if n["new_tokens"] < 2:
        raise ValueError(f"--new-tokens={n['new_tokens']} is invalid: allowed an integer >= 2 (a decode rate "
                         f"needs two tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        result = FrontierResult.from_dict(json.loads(Path(args.replot).read_text()), budget)
        return report(result, args)
    text, text_path = read_text(args.text)
    log(f"loading {args.model}")
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"--model={args.model!r} has no tokenizer and a vocabulary under 256: allowed a "
                             f"model with a tokenizer")
        tok = ByteTokenizer()
    log(f"loaded; {len(settings) - 1} settings and dense, budget: {budget.describe()}")
    result = frontier(model, tok, text, settings, budget, **n, prefill=args.prefill, lowering=args.lowering,
                      cache_dir=None if args.no_cache else cache_root(), model_name=str(args.model),
                      text_name=Path(text_path).name if text_path else "text", progress=not args.no_progress, log=log)
    result.info["text_path"] = text_path
    return report(result, args)


def report(result: FrontierResult, args: argparse.Namespace) -> int:
    """Print the table, the pick and (with ``--out``) write frontier.json, frontier.md and frontier.png."""
    files = {}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "frontier.json", "md": out / "frontier.md", "png": out / "frontier.png"}
        files["json"].write_text(json.dumps(result.as_dict(), indent=2))
        files["md"].write_text(result.markdown() + "\n")
        result.plot(files["png"])
    human = sys.stderr if args.json else sys.stdout
    print(result.table(), file=human)
    i = result.info
    print(f"quality: {i['windows']} windows of {i['prompt_len']}+{i['cont_len']} tokens of {i['text_name']}, decode "
          f"mode; speed: median decode tokens/s of {i['rounds']} interleaved rounds of {i['new_tokens']} new tokens, "
          f"batch 1, {i['threads']} threads, {i['dtype']} (noisy on a shared machine)", file=human)
    print(result.summary(), file=human)
    for kind, p in files.items():
        print(f"wrote {kind}: {p}", file=human)
    if args.json:
        payload = result.as_dict()
        payload["files"] = {k: str(v) for k, v in files.items()}
        print(json.dumps(payload, indent=2))
    return 0


__all__ = ["SHARED_FLAGS", "add_arguments", "report", "run"]
