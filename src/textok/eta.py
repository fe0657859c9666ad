"""One line that says how long a long job will take, printed once its first steps have been timed.

Why: a progress bar is hidden when the output is not a terminal (logs, ``make`` under CI) and says nothing until
it has run a while; one line such as ``train: about 4 min for 3000 steps (12.5 steps/s)`` tells a user whether
to wait, shrink the job or set ``--threads``. The first step is not timed (it pays for warm-up: allocations,
kernel selection, caches).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """``40 s``, ``3 min``, ``2 h 05 min``: the precision an estimate deserves."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Eta:
    """Call :meth:`step` after each unit of work; after ``after`` timed units (or ``min_seconds`` of them) one
    estimate of the time left for ``total`` units is printed (with ``note`` beside the rate), and nothing more."""

    def __init__(self, total: int, label: str, unit: str = "steps", *, done: int = 0, after: int = 5,
                 min_seconds: float = 2.0, note: str = "", stream: TextIO | None = None,
                 write: Callable[[str], None] | None = None, clock=time.perf_counter) -> None:
        self.total, self.label, self.unit, self.note = total, label, unit, note
        self.write = write  # e.g. a progress bar's write, which prints above the bar instead of through it
        self.done = done
        self.after, self.min_seconds = after, min_seconds
        self.stream = stream
        self.clock = clock
        self.start: float | None = None
        self.timed = 0
        self.printed = total - done <= 1

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.printed:
            return
        now = self.clock()
        if self.start is None:  # the first unit (warm-up) is not timed
            self.start = now
            return
        self.timed += n
        elapsed = now - self.start
        if self.timed >= self.after and elapsed >= self.min_seconds or self.timed >= 10 * self.after:
            rate = self.timed / max(elapsed, 1e-9)
            left = max(self.total - self.done, 0) / rate
            line = (f"{self.label}: about {format_duration(left)} for the {self.total - self.done} {self.unit} left "
                    f"of {self.total} ({rate:.3g} {self.unit}/s{'; ' + self.note if self.note else ''})")
            if self.write is not None:
                self.write(line)
            else:
                print(line, file=self.stream or sys.stdout, flush=True)
            self.printed = True


__all__ = ["Eta", "format_duration"]
