"""A tiny progress bar on stderr, without dependencies.

On a terminal it redraws one line in place; when stderr is a file or a pipe (CI logs) it writes one plain
line per step instead, because carriage returns turn logs into noise.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` steps; :meth:`step` advances by one and shows what was just done.

    Use as a context manager (or call :meth:`close`) so a terminal line ends with a newline.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24):
        self.total = max(int(total), 1)
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.tty = _is_tty(self.stream)
        self._started = time.perf_counter()
        self._last_len = 0

    def step(self, message: str = "") -> None:
        """Mark one step done; ``message`` says which (e.g. ``"host put 6.1 GB/s"``)."""
        self.done = min(self.done + 1, self.total)
        if self.tty:
            self._redraw(message)
        else:
            self.stream.write(f"[{self.done}/{self.total}] {message}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (terminal only)."""
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0

    def _redraw(self, message: str) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._started
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.1f}s {message}"
        # Pad with spaces so a shorter line fully covers the previous one.
        self.stream.write("\r" + line.ljust(self._last_len))
        self._last_len = len(line)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
