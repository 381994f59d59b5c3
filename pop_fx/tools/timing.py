"""Timing for the benchmarks: a region on one device (``Clock``), one variant's samples (``Cell``), and the
decode steps inside one ``generate()`` (``StepStamps``, a logits processor that stamps every step).

The decode rate is taken between the first and the last new token of the same call, so the prefill (and
POP's layout build) never counts against it; ``pop-fx bench``, ``pop-fx frontier`` and ``pop-fx demo`` all
read it this way.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor


class Clock:
    """Wall time of a region on one device: ``perf_counter`` on the CPU; on CUDA the region is synchronized
    on both ends and timed with CUDA events (device work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds_since(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - start


@dataclass
class Cell:
    """One variant's timings in one benchmark run: samples (ms or tokens/s, the caller's unit), its last
    prefill's seconds and the extra bytes its POP state holds."""

    variant: str
    times: list = field(default_factory=list)
    prefill_s: float = float("nan")
    extra_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


class StepStamps(LogitsProcessor):
    """Records ``time.perf_counter()`` when each step's logits are ready (one stamp per new token).

    ``sync``: synchronize the CUDA device before each stamp (its work is asynchronous: without it the stamps
    time the launches, not the steps)."""

    def __init__(self, sync: bool = False):
        self.t: list[float] = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        if self.sync:
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores

    def decode_rate(self) -> float:
        """New tokens per second between the first and the last stamp (nan with fewer than two)."""
        t = self.t
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9) if len(t) > 1 else float("nan")


__all__ = ["Cell", "Clock", "StepStamps"]
