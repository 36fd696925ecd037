"""Deadlines for the loop: the only reason select() ever gets a timeout.

The loop blocks in select() with the time to the nearest deadline (or forever when there is none)
and runs what is due when it wakes. Nothing polls for state changes.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class Timer:
    """A handle to a scheduled call; cancel() makes it a no-op."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """A heap of Timers on the monotonic clock."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
        return timer

    def timeout(self) -> float | None:
        """Seconds until the nearest live deadline, or None when there is none."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    def run_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _deadline, _seq, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancel()
                timer.callback()
