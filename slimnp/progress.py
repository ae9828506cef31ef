"""A small progress line for long work (training epochs, downloads).

On a terminal it redraws one line in place at most every ``interval``
seconds; in a log file (not a TTY) it prints a fresh line every
``log_interval`` seconds, so CI logs stay short but alive.
"""
from __future__ import annotations

import sys
import time


def fmt_duration(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, enabled: bool = True,
                 interval: float = 0.2, log_interval: float = 30.0, width: int = 24):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else log_interval
        self.width = width
        self.start = time.perf_counter()
        self.last = 0.0
        self.done = 0
        self._drawn = False
        self._first = None  # (time, done) at the first update

    def update(self, done: int, info: str = "", force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        frac = min(1.0, done / self.total)
        # the rate since the first update: the first unit of work also pays
        # one-off costs (compiling the kernels), which would inflate the ETA
        if self._first is None:
            self._first = (now, done)
        t0, d0 = self._first
        eta = "--:--" if done <= d0 else fmt_duration((now - t0) / (done - d0) * (self.total - done))
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"{self.label} [{bar}] {frac * 100:5.1f}% {info} ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


class DownloadBar:
    """A progress line for downloads of unknown count: ``bar(done, total)``
    as :func:`slimnp.fetch.fetch`'s ``progress``; a new file (another total)
    starts a new line.  ``enabled=False``: silent."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or self.bar.total != max(total, 1):
            self.close()
            self.bar = Progress(max(total, 1), "download")
        self.bar.update(done, f"{done / 1e6:.1f}/{total / 1e6:.1f} MB", force=done >= total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
