"""A rate limiter for log lines that could otherwise flood the log.

A server that runs out of descriptors fails every accept() for as long as the shortage lasts;
logging each failure would turn one problem (no fds) into two (no fds and a full disk). The limiter
lets one line through per interval and counts what it held back, so the next line can say how
many it stands for.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Let at most one event through per `interval` seconds; count the rest.

    Methods for the caller:

    - allow() -> int | None: None when the event should be dropped; otherwise the number of events
      suppressed since the last one let through (0 for the first).

    Thread-safe: thread-pool workers and the loop may share one limiter.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
