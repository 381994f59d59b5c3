"""Real weights in an MoE: SmolLM2-135M with every FFN split into E experts, POP per expert vs POP per FFN.

    python examples/moe_smollm2.py                       # E=4, r in {0, 0.5}, 8 windows of 128 + 64 tokens

``pop_fx.tools.models.split_into_experts`` turns each FFN (d_ff 1536) into E experts of contiguous
channel blocks behind a router that activates all of them with weight 1: the same function as
the dense model up to floating-point summation order. POP then partitions each expert on the
prefill tokens routed to it (all of them here), so at sparsity r every expert keeps (1-r) of its
own channels, where the dense-FFN POP picks (1-r)·d_ff channels anywhere in the FFN.
The table gives decode-mode next-token agreement with the dense model (as
``pop_fx.tools.agreement.next_token_agreement``) and decode-mode perplexity of the continuations
(teacher-forced windows of the World English Bible: prefill the prompt, then one token per step through
the cache), computed with the eager reference (``pop_fx.reference.pruned``) on both models.
``--check-compiled N`` also compiles the split model with ``pop_fx.compile`` and checks N greedy tokens.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pop_fx import PopConfig
from pop_fx.tools.agreement import decode_logits
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


def perplexity(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int) -> float:
    """exp(mean NLL) of the continuation tokens ``ids[:, prompt_len:]`` under decode-mode ``logits``."""
    pred = logits[:, :-1]  # the last position predicts past the window
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), ids[:, prompt_len:].reshape(-1))
    return math.exp(nll.item())


def measure(dense, moe, ids: torch.Tensor, prompt_len: int, sparsities, candidate_ratio: float = 0.1) -> list[dict]:
    """Per sparsity, the dense-FFN POP and the per-expert POP: decode-mode next-token agreement with the dense
    model's argmax, and decode-mode perplexity of the windows' continuations."""
    dense_logits = decode_logits(dense, ids, prompt_len)
    dense_argmax = dense_logits.argmax(-1)
    moe_logits = decode_logits(moe, ids, prompt_len)
    rows = [{"r": "dense", "dense_ffn_pop": 1.0, "moe_pop": (moe_logits.argmax(-1) == dense_argmax).float().mean().item(),
             "dense_ffn_ppl": perplexity(dense_logits, ids, prompt_len),
             "moe_ppl": perplexity(moe_logits, ids, prompt_len)}]
    for r in sparsities:
        cfg = PopConfig(sparsity=r, candidate_ratio=candidate_ratio)
        row = {"r": r}
        for name, model in (("dense_ffn", dense), ("moe", moe)):
            with pruned(model, cfg):
                logits = decode_logits(model, ids, prompt_len)
            key = "dense_ffn_pop" if name == "dense_ffn" else "moe_pop"
            row[key] = (logits.argmax(-1) == dense_argmax).float().mean().item()
            row[f"{name}_ppl"] = perplexity(logits, ids, prompt_len)
        rows.append(row)
    return rows


def check_compiled(moe, tok, sparsity: float, candidate_ratio: float, new_tokens: int) -> bool:
    """``pop_fx.compile`` on the split model: greedy ``generate()`` tokens equal the eager reference's."""
    import pop_fx

    cfg = PopConfig(sparsity=sparsity, candidate_ratio=candidate_ratio)
    ids = tok("In the beginning, God created the heavens and the earth. The earth was", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad(), pruned(moe, cfg):
        want = moe.generate(ids, **kw)
    compiled = pop_fx.compile(copy.deepcopy(moe), cfg)
    with torch.no_grad():
        got = compiled.generate(ids, **kw)
    warnings = pop_fx.report(compiled).warnings
    same = torch.equal(got, want)
    print(f"compiled per-expert POP r={sparsity}: {new_tokens} greedy tokens equal the reference: {same}"
          f" (report warnings: {warnings})")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (a power of two dividing 1536)")
    parser.add_argument("--sparsities", default="0,0.5", help="comma-separated r values")
    parser.add_argument("--candidate-ratio", type=float, default=0.1)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64, help="teacher-forced decode steps per window")
    parser.add_argument("--check-compiled", type=int, default=0, metavar="N",
                        help="also compile the split model (pop_fx.compile, r = the last --sparsities value) and "
                             "check N greedy generate() tokens against the eager reference")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    dense, tok = load_model("smollm2")
    moe = split_into_experts(dense, args.experts)
    ids = windows(tok, args.windows, args.prompt_len + args.gen_len)
    rows = measure(dense, moe, ids, args.prompt_len, [float(r) for r in args.sparsities.split(",")],
                   args.candidate_ratio)
    print(f"SmolLM2-135M, {args.experts} experts per FFN, {args.windows} windows of {args.prompt_len} + "
          f"{args.gen_len} tokens, candidate_ratio {args.candidate_ratio}: agreement with dense, decode-mode perplexity")
    print(f"{'r':>6s} {'dense-FFN POP':>14s} {'per-expert POP':>15s} {'ppl dense-FFN':>14s} {'ppl per-expert':>15s}")
    for row in rows:
        print(f"{row['r']!s:>6s} {row['dense_ffn_pop']:14.4f} {row['moe_pop']:15.4f} {row['dense_ffn_ppl']:14.3f}"
              f" {row['moe_ppl']:15.3f}")
    ok = True
    if args.check_compiled:
        ok = check_compiled(moe, tok, float(args.sparsities.split(",")[-1]), args.candidate_ratio, args.check_compiled)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
