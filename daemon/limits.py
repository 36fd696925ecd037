"""xinetd's per-service limits: instances, per_source, cps and access_times.

Checked in verify_request, after allow/deny, for every server (handler or command):

- access_times: outside these local time ranges, connections are refused.
- cps = [N, S]: more than N new connections within one second disables the service for S seconds
  (the supervisor takes the listener out of the selector and refuses its backlog).
- instances: at most N requests running or queued at once.
- per_source: at most N concurrent connections from one client address.

A refused request is closed at once (after banner_fail, if set) and counted by reason.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import ServerConfig


class RequestLimits:
    """The limits of one server. Thread-safe: thread-pool workers report finished requests.

    Methods for the caller:

    - refusal(client_address, in_use) -> str | None: the reason to refuse, or None to admit.
    - started(client_address) / finished(client_address): per_source bookkeeping around a
      request that was admitted.
    """

    def __init__(self, config: ServerConfig, on_cps_exceeded: Callable[[], None]) -> None:
        self.instances = config.instances
        self.per_source = config.per_source
        self.cps = config.cps
        self.access_times = config.access_times
        self.on_cps_exceeded = on_cps_exceeded
        self.active = bool(self.instances or self.per_source or self.cps or self.access_times)
        self._sources: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._window = 0
        self._in_window = 0

    def refusal(self, client_address: Any, in_use: Callable[[], int]) -> str | None:
        if self.cps is not None:
            now = int(time.monotonic())
            if now != self._window:
                self._window, self._in_window = now, 0
            self._in_window += 1
            if self._in_window > self.cps[0]:
                self.on_cps_exceeded()
                return "cps"
        if self.access_times and not in_access_times(self.access_times):
            return "access_times"
        if self.instances is not None and in_use() >= self.instances:
            return "instances"
        if self.per_source is not None:
            with self._lock:
                if self._sources[_source(client_address)] >= self.per_source:
                    return "per_source"
        return None

    def started(self, client_address: Any) -> None:
        if self.per_source is not None:
            with self._lock:
                self._sources[_source(client_address)] += 1

    def finished(self, client_address: Any) -> None:
        if self.per_source is not None:
            source = _source(client_address)
            with self._lock:
                self._sources[source] -= 1
                if self._sources[source] <= 0:
                    del self._sources[source]


def _source(client_address: Any) -> str:
    if isinstance(client_address, tuple) and client_address:
        return str(client_address[0])
    return ""


def in_access_times(ranges: tuple[tuple[int, int], ...], now: float | None = None) -> bool:
    """Whether the local time falls in one of the (first, last minute of the day) ranges; a
    range whose first minute is after its last wraps midnight."""
    t = time.localtime(now)
    minute = t.tm_hour * 60 + t.tm_min
    for first, last in ranges:
        if first <= last:
            if first <= minute <= last:
                return True
        elif minute >= first or minute <= last:
            return True
    return False
