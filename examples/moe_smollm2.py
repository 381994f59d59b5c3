"""Real weights in an MoE: SmolLM2-135M with every FFN split into E experts, POP per expert vs POP per FFN.

    python examples/moe_smollm2.py                       # E=4, r in {0, 0.5}, 8 windows of 128 + 64 tokens

``pop_fx.tools.models.split_into_experts`` turns each FFN (d_ff 1536) into E experts of contiguous
channel blocks behind a router that activates all of them with weight 1: the same function as
the dense model up to floating-point summation order. POP then partitions each expert on the
prefill tokens routed to it (all of them here), so at sparsity r every expert keeps (1-r) of its
own channels, where the dense-FFN POP picks (1-r)·d_ff channels anywhere in the FFN.
The table gives decode-mode next-token agreement with the dense model
(``pop_fx.tools.agreement.next_token_agreement``, teacher-forced windows of the World English Bible),
computed with the eager reference (``pop_fx.reference.pruned``) on both models.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pop_fx import PopConfig
from pop_fx.tools.agreement import decode_logits, next_token_agreement
from pop_fx.tools.models import load_model, split_into_experts
from pop_fx.reference import pruned

TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "web_bible.txt"


def windows(tok, n: int, length: int, text: Path = TEXT) -> torch.Tensor:
    """``n`` windows of ``length`` tokens starting at evenly spaced places of the text: [n, length].

    Only a slice of characters around each start is tokenized (the whole Bible takes a minute).
    """
    chars = text.read_text(encoding="utf-8")
    span = 8 * length  # characters: > length tokens of English prose
    starts = [i * (len(chars) - span) // max(n - 1, 1) for i in range(n)]
    out = []
    for s in starts:
        ids = tok(chars[s:s + span], return_tensors="pt").input_ids[0]
        if ids.numel() < length:
            raise ValueError(f"{text}: {span} characters at {s} give only {ids.numel()} < {length} tokens")
        out.append(ids[:length])
    return torch.stack(out)


def measure(dense, moe, ids: torch.Tensor, prompt_len: int, sparsities, candidate_ratio: float = 0.1) -> list[dict]:
    """Agreement with the dense model's argmax of the dense-FFN POP and of the per-expert POP, per sparsity."""
    dense_argmax = decode_logits(dense, ids, prompt_len).argmax(-1)
    moe_logits = decode_logits(moe, ids, prompt_len)
    rows = [{"r": "dense", "dense_ffn_pop": 1.0,
             "moe_pop": (moe_logits.argmax(-1) == dense_argmax).float().mean().item()}]
    for r in sparsities:
        cfg = PopConfig(sparsity=r, candidate_ratio=candidate_ratio)
        rows.append({
            "r": r,
            "dense_ffn_pop": next_token_agreement(dense, ids, prompt_len, lambda: pruned(dense, cfg), dense_argmax),
            "moe_pop": next_token_agreement(moe, ids, prompt_len, lambda: pruned(moe, cfg), dense_argmax),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (a power of two dividing 1536)")
    parser.add_argument("--sparsities", default="0,0.5", help="comma-separated r values")
    parser.add_argument("--candidate-ratio", type=float, default=0.1)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64, help="teacher-forced decode steps per window")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    dense, tok = load_model("smollm2")
    moe = split_into_experts(dense, args.experts)
    ids = windows(tok, args.windows, args.prompt_len + args.gen_len)
    rows = measure(dense, moe, ids, args.prompt_len, [float(r) for r in args.sparsities.split(",")],
                   args.candidate_ratio)
    print(f"SmolLM2-135M, {args.experts} experts per FFN, {args.windows} windows of {args.prompt_len} + "
          f"{args.gen_len} tokens, candidate_ratio {args.candidate_ratio}: next-token agreement with dense")
    print(f"{'r':>6s} {'dense-FFN POP':>14s} {'per-expert POP':>15s}")
    for row in rows:
        print(f"{row['r']!s:>6s} {row['dense_ffn_pop']:14.4f} {row['moe_pop']:15.4f}")
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
