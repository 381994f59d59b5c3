"""``pop-fx eval``: its flags and its run."""

from __future__ import annotations

import argparse
import json
import sys

from pop_fx.tools.evaluation.harness import BACKENDS, evaluate
from pop_fx.tools.evaluation.methods import DEFAULT_GAMMAS, DEFAULT_METHODS, DEFAULT_SPARSITIES, METHOD_NAMES
from pop_fx.tools.evaluation.text import ByteTokenizer


SHARED_FLAGS = ("model", "prefill", "dtype", "json")
"""The shared flags (pop_fx.tools.cli) eval reads: r comes from --sparsities (or --total-reductions), γ from the
methods and --gammas, and the scope from --batch-size ("sequence" when > 1)."""


def float_list(s: str) -> list[float]:
    """``"0.2,0.3"`` -> [0.2, 0.3] (an argparse type)."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pop-fx eval`` flags, beside the shared ones of ``SHARED_FLAGS``."""
    g = parser.add_argument_group("evaluation")
    g.add_argument("--text", default=None, help="text file to cut windows from (default: the World English Bible sample packaged with pop-fx, pop_fx/data/web_bible_sample.txt)")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHOD_NAMES)} (default %(default)s)")
    g.add_argument("--sparsities", "--sparsity", dest="sparsities", type=float_list, default=list(DEFAULT_SPARSITIES),
                   help="FFN sparsities r, comma-separated: every method runs at each (default %(default)s)")
    g.add_argument("--total-reductions", type=float_list, default=None, help="instead of --sparsities: total decoder-parameter reductions, converted per model (pop_fx.tools.budget)")
    g.add_argument("--gammas", type=float_list, default=list(DEFAULT_GAMMAS), help="γ values the method 'pop' expands to (default %(default)s)")
    g.add_argument("--windows", type=int, default=32, help="evaluation windows (default %(default)s)")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per window (default %(default)s)")
    g.add_argument("--cont-len", type=int, default=128, help="continuation tokens per window, fed one per decode step (default %(default)s)")
    g.add_argument("--greedy-windows", type=int, default=None, help="greedy generation on the first N windows only (default: all)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per batch; > 1 uses scope='sequence' (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random baseline and torch (default %(default)s)")
    g.add_argument("--calib-windows", type=int, default=16, help="wanda-sp calibration windows, cut from the last --calib-fraction of the text (default %(default)s)")
    g.add_argument("--calib-fraction", type=float, default=0.1, help="share of the text kept for calibration only (default %(default)s)")
    g.add_argument("--backend", choices=BACKENDS, default="reference", help="POP methods through the eager reference or pop_fx.compile (default %(default)s)")
    g.add_argument("--check-agreement", type=int, default=2, help="windows run through both backends when pop_fx.compile exists; 0 = off (default %(default)s)")
    g.add_argument("--out", default=None, help="directory for eval.csv, eval.json and eval.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.models import load_model

    dtype = getattr(args, "dtype", None)
    model_name = getattr(args, "model", None) or "smollm2"
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, tokenizer = load_model(model_name, **kwargs)
    model.eval()
    if tokenizer is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"model={model_name!r} comes without a tokenizer and has a vocabulary under 256: allowed a model with a tokenizer")
        tokenizer = ByteTokenizer()
    sparsities = args.sparsities
    if args.total_reductions:
        from pop_fx.tools.budget import ffn_sparsity_for_model

        sparsities = [round(ffn_sparsity_for_model(model.config, t), 4) for t in args.total_reductions]
    result = evaluate(
        model,
        tokenizer,
        args.text,
        methods=args.methods.split(","),
        sparsities=sparsities,
        gammas=args.gammas,
        n_windows=args.windows,
        prompt_len=args.prompt_len,
        cont_len=args.cont_len,
        batch_size=args.batch_size,
        seed=args.seed,
        calib_windows=args.calib_windows,
        calib_fraction=args.calib_fraction,
        prefill=getattr(args, "prefill", None) or "pruned",
        backend=args.backend,
        check_agreement=args.check_agreement,
        progress=not args.no_progress,
        model_name=str(model_name),
        greedy_windows=args.greedy_windows,
        on_row=(lambda res: res.write(args.out, stem="eval.partial")) if args.out else None,
    )
    if args.total_reductions:
        result.settings["total_reductions"] = list(args.total_reductions)
    files = result.write(args.out) if args.out else {}
    as_json = bool(getattr(args, "json", False))
    human = sys.stderr if as_json else sys.stdout
    print(result.table(), file=human)
    for kind, p in files.items():
        print(f"wrote {kind}: {p}", file=human)
    if as_json:
        payload = result.as_dict()
        payload["files"] = {k: str(v) for k, v in files.items()}
        print(json.dumps(payload, indent=2))
    return 0
