"""Rate-limited logging of storage failures: a failing disk must not flood the log.

A dying SSD or a full filesystem fails every block that touches it, hundreds a second. Each failure is counted
in ``stats()``; the log says once what happened and what to do, then at most one summary per interval while
the failures go on.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable

__all__ = ["FailureLog"]

SUMMARY_INTERVAL_S = 60.0


class FailureLog:
    """Logs the first failure of each ``kind`` at WARNING; later ones of that kind are only counted, and the next
    one after ``interval_s`` logs a one-line summary ("N more since ...") with its own message. Thread-safe."""

    def __init__(self, logger: logging.Logger, interval_s: float = SUMMARY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[Hashable, list] = {}  # kind -> [time of the last line, failures since it]

    def report(self, kind: Hashable, message: str) -> None:
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                self._kinds[kind] = [now, 0]
                line = (f"{message} (logged once: further failures like this are counted in stats() and "
                        f"summarised here at most every {self._interval:g} s)")
            else:
                state[1] += 1
                if now - state[0] < self._interval:
                    return
                line = f"{state[1]} more failures like this in the last {now - state[0]:.0f} s; the latest: {message}"
                state[0], state[1] = now, 0
        self._log.warning(line)
