"""The benchmark's progress line on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (a line per item when stderr is not a terminal).

    Also callable as ``progress(done, total, label)`` or ``progress(label)`` (for
    the GPU run, ``hwoptim.bench.gpu``)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.stream = max(total, 1), 0, stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.label = ""

    def _draw(self):
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        el = time.perf_counter() - self.t0
        eta = f"{el / frac - el:4.0f}s left" if 0 < frac < 1 else f"{el:4.0f}s"
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"[{bar}] {self.done:>3}/{self.total} {eta}  {self.label}"
        if self.tty:
            self.stream.write("\r" + line[:118].ljust(118))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, label: str):
        self.label = label
        if self.tty:
            self._draw()

    def advance(self, k: int = 1):
        self.done += k
        self._draw()

    def __call__(self, *args, **kw):
        if len(args) >= 3:
            done, total, label = args[:3]
            self.label = f"GPU {done}/{total} {label}"
        elif args:
            self.label = f"GPU {args[0]}"
        if self.tty:
            self._draw()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
