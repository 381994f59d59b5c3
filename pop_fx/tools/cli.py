"""The ``pop-fx`` console script: one subcommand per module, sharing the model/config flags.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``, and may name the shared
flags it reads (``SHARED_FLAGS``; default all of them: a flag a subcommand would ignore is not offered) and
its own help for ``--model`` (``MODEL_HELP``). A module that does not exist (yet) is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from pop_fx.config import PopConfig

SUBCOMMANDS = {
    "demo": "pop_fx.tools.demo",
    "eval": "pop_fx.tools.evaluation",
    "bench": "pop_fx.tools.bench",
    "inspect": "pop_fx.tools.inspect",
    "frontier": "pop_fx.tools.frontier",
}


SHARED_FLAGS = ("model", "sparsity", "candidate_ratio", "scope", "prefill", "dtype", "json")
MODEL_HELP = "'smollm2', a local HF folder, a .gguf file or a tiny family name (default %(default)s)"


def add_shared_arguments(parser: argparse.ArgumentParser, flags=SHARED_FLAGS, model_help: str | None = None) -> None:
    """The shared flags among ``flags`` (defaults are PopConfig's)."""
    unknown = set(flags) - set(SHARED_FLAGS)
    if unknown:
        raise ValueError(f"shared flags {sorted(unknown)} are unknown: allowed {list(SHARED_FLAGS)}")
    d = PopConfig()
    g = parser.add_argument_group("model and POP configuration")
    add = {
        "model": lambda: g.add_argument("--model", default="smollm2", help=model_help or MODEL_HELP),
        "sparsity": lambda: g.add_argument("--sparsity", type=float, default=d.sparsity, help="r: FFN channels inactive per decode step, 0 <= r < 1 (default %(default)s)"),
        "candidate_ratio": lambda: g.add_argument("--candidate-ratio", type=float, default=d.candidate_ratio, help="γ: candidate band width as a fraction of d_ff, 0..2 (default %(default)s)"),
        "scope": lambda: g.add_argument("--scope", choices=["batch", "sequence"], default=d.scope, help="one partition per batch or per sequence (default %(default)s)"),
        "prefill": lambda: g.add_argument("--prefill", choices=["pruned", "dense"], default=d.prefill, help="prefill under the pruned mask (paper) or exact (default %(default)s)"),
        "dtype": lambda: g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default %(default)s)"),
        "json": lambda: g.add_argument("--json", action="store_true", help="machine-readable output on stdout"),
    }
    for name in SHARED_FLAGS:
        if name in flags:
            add[name]()


def config_from_args(args: argparse.Namespace) -> PopConfig:
    """The PopConfig the shared flags describe (invalid values raise ValueError naming the field)."""
    return PopConfig(sparsity=args.sparsity, candidate_ratio=args.candidate_ratio, scope=args.scope, prefill=args.prefill)


def available_subcommands() -> dict[str, str]:
    return {name: mod for name, mod in SUBCOMMANDS.items() if importlib.util.find_spec(mod) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pop-fx", description="Partition-guided Online Pruning of FFN channels while decoding.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(available_subcommands()) + "}")
    for name, mod_name in available_subcommands().items():
        module = importlib.import_module(mod_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None)
        add_shared_arguments(p, getattr(module, "SHARED_FLAGS", SHARED_FLAGS), getattr(module, "MODEL_HELP", None))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ValueError as e:  # bad user input: one clear line, not a traceback
        print(f"pop-fx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
