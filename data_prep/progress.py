"""Wall time per phase of a data stage, logged as it ends with its rows/s, and kept for the
stage's counts (``phase_s``) so a run's profile is in its own record.

    phases = Phases("filter")
    with phases("score", rows=n):
        ...
    counts["phase_s"] = phases.seconds
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("genmodels")


class Phases:
    def __init__(self, stage: str):
        self.stage = stage
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, rows: int | None = None) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 3)
        rate = f", {rows / dt:.1f} rows/s" if rows and dt > 0 else ""
        log.info("[%s] %s: %.1fs%s", self.stage, name, dt, f" ({rows} rows{rate})" if rows is not None else "")


def every(stage: str, what: str, period_s: float = 10.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs ``[stage] what: done/total (rate/s)`` at most
    every ``period_s`` seconds, and always at the last one."""
    t0 = time.perf_counter()
    last = [t0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= period_s:
            last[0] = now
            log.info("[%s] %s: %d/%d (%.2f/s)", stage, what, done, total, done / max(now - t0, 1e-9))

    return report
