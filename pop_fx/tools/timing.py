"""Timing decode steps inside one ``generate()``: a logits processor that stamps every step.

The decode rate is taken between the first and the last new token of the same call, so the prefill (and
POP's layout build) never counts against it; ``pop-fx bench`` and ``pop-fx demo`` both read it this way.
"""

from __future__ import annotations

import time

from transformers import LogitsProcessor


class StepStamps(LogitsProcessor):
    """Records ``time.perf_counter()`` when each step's logits are ready (one stamp per new token).

    ``sync``: synchronize the CUDA device before each stamp (its work is asynchronous: without it the stamps
    time the launches, not the steps)."""

    def __init__(self, sync: bool = False):
        self.t: list[float] = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        if self.sync:
            import torch

            torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores

    def decode_rate(self) -> float:
        """New tokens per second between the first and the last stamp (nan with fewer than two)."""
        t = self.t
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9) if len(t) > 1 else float("nan")


__all__ = ["StepStamps"]
