"""SmolLM2-135M on the World English Bible: POP against its ablations and static baselines.

    python examples/eval_smollm2.py --out out/eval            # r in {0.3, 0.5}, 32 windows of 128 + 128

The same as ``pop-fx eval --sparsities 0.3,0.5 --out out/eval``; kept as a
script so the run that fills the closing table of issue 6 is one command.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pop_fx.tools import evaluation
from pop_fx.tools.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    evaluation.add_arguments(parser)
    # README's tables were measured on the whole text (../shared/), not on the packaged sample.
    parser.set_defaults(sparsities=[0.3, 0.5], batch_size=64, text=str(evaluation.text.shared_text_path()))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rc = evaluation.run(args)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
