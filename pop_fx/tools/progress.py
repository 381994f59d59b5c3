"""One line per phase of a long command, with the seconds since it started, and a heartbeat inside a phase.

    log = Progress()
    log("loading smollm2")                    # [   0.0 s] loading smollm2
    with log.phase("compiling dense"):        # [   2.1 s] compiling dense ...
        ...                                   # [  12.1 s]   ... compiling dense: 10 s so far
                                              # [  31.7 s]   done in 29.6 s

Compiling a 30-layer model through Inductor on 2 cores takes minutes: without the heartbeat a user sees
nothing and cannot tell a slow step from a hung one.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None, heartbeat_s: float = 10.0):
        self.t0 = time.perf_counter()
        self.enabled = enabled
        self.stream = stream
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        if self.enabled:
            with self._lock:
                print(f"[{self.elapsed():7.1f} s] {msg}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, msg: str):
        """Announce ``msg``, repeat a heartbeat line every ``heartbeat_s`` while it runs, then its duration."""
        self(f"{msg} ...")
        start = time.perf_counter()
        stop = threading.Event()

        def beat():
            while not stop.wait(self.heartbeat_s):
                self(f"  ... {msg}: {time.perf_counter() - start:.0f} s so far")

        ticker = threading.Thread(target=beat, daemon=True) if self.enabled and self.heartbeat_s > 0 else None
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
        self(f"  done in {time.perf_counter() - start:.1f} s")


__all__ = ["Progress"]
