"""Inline and thread-pool dispatch.

inline: the request runs in the loop itself. Right for datagrams and tiny built-ins; the
per-connection timeout bounds how long a stalled stream client can hold the loop.

thread: a bounded pool of `workers` threads per server, started on demand up to the bound and
kept, fed from a queue that holds at most `max_queue` requests waiting for a free thread. Never a
thread per connection. The pool tells the loop when it has gone idle (through a Wakeup) so that a
drain completes without polling.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import scheduling
from .connections import Running, Task, Watchdog, shut
from .listeners import ManagedMixIn


class InlineDispatcher:
    """Run each request in the loop's own thread."""

    def __init__(self, server: ManagedMixIn) -> None:
        self.server = server
        self._running = 0

    def submit(self, request: Any, client_address: Any) -> bool:
        self._running += 1
        started = time.perf_counter()
        ok = False
        try:
            ok = self.server.run_request(request, client_address)
        finally:
            self._running -= 1
            self.server.counters.finished(time.perf_counter() - started, not ok)
            self.server.request_finished(client_address)
        return True

    def active(self) -> int:
        return self._running

    def queued(self) -> int:
        return 0

    def idle(self) -> bool:
        return self._running == 0

    def drain(self) -> None:
        pass

    def force(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return self._running == 0


class ThreadPool:
    """At most `workers` threads and `max_queue` waiting requests for one server.

    Methods for the caller (the loop's thread):

    - submit(request, client_address) -> bool: False when the pool and its queue are full.
    - active(), queued() -> int; idle() -> bool
    - force() -> int: cut off running and queued requests (shut their sockets down); how many.
    - close(): stop the threads once idle (after a drain).

    `on_idle` is called from a worker thread whenever the pool runs out of work: it must be
    thread-safe and cheap (the supervisor passes its Wakeup.wake). `call_later` is the loop's
    timer, for the watchdog of a server whose connections have one (see connections.py). With
    `cpu`, every thread of the pool runs on that CPU only ([daemon] thread_cpu).
    """

    def __init__(
        self,
        server: ManagedMixIn,
        workers: int,
        max_queue: int,
        on_idle: Callable[[], None],
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        cpu: int | None = None,
    ) -> None:
        self.server = server
        self._cpu = cpu
        self._policy = scheduling.PoolPolicy(server.name, server.config)
        self.workers = workers
        self.max_queue = max_queue
        self._on_idle = on_idle
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle_threads = 0  # threads blocked in get()
        self._waiting = 0  # requests in the queue, not yet taken by a thread
        self._outstanding = 0  # submitted and not finished: running + waiting
        # The requests in a handler right now: request -> (client_address, time.monotonic(),
        # the thread running it).
        self._running: dict[Any, tuple[Any, float, Task]] = {}
        self._watchdog = (
            None
            if call_later is None
            else Watchdog.for_server(server, self._running_sockets, call_later)
        )

    def submit(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            if self._outstanding >= self.workers + self.max_queue:
                return False
            self._outstanding += 1
            self._waiting += 1
            # Each waiting request needs a thread blocked in get(); start one if it lacks one.
            start = self._waiting > self._idle_threads and len(self._threads) < self.workers
            if start:
                thread = threading.Thread(
                    target=self._work, name=f"selectd-{self.server.name}-{len(self._threads)}"
                )
                thread.daemon = True
                self._threads.append(thread)
        if start:
            thread.start()
        self._queue.put((request, client_address))
        if self._watchdog is not None:
            self._watchdog.arm()
        return True

    def _running_sockets(self) -> list[Running]:
        with self._lock:
            return [(r, address, t, task) for r, (address, t, task) in self._running.items()]

    def _work(self) -> None:
        if self._cpu is not None:
            # Threads share one GIL: on one CPU, handing it over is a local wake-up, where
            # across CPUs every hand-over is an inter-processor one (README, "thread_cpu").
            os.sched_setaffinity(0, {self._cpu})
        self._policy.apply()
        run = self.server.run_request
        get = self._queue.get
        lock = self._lock
        counters = self.server.counters
        request_finished = self.server.request_finished
        monotonic = time.monotonic
        task = Task(os.getpid(), threading.get_native_id())
        while True:
            with lock:
                self._idle_threads += 1
            item = get()
            with lock:
                self._idle_threads -= 1
                if item is None:
                    return
                self._waiting -= 1
                request, client_address = item
                started = monotonic()
                self._running[request] = (client_address, started, task)
            ok = False
            try:
                ok = run(request, client_address)
            finally:
                with lock:
                    del self._running[request]
                    self._outstanding -= 1
                    now_idle = self._outstanding == 0
                counters.finished(monotonic() - started, not ok)
                request_finished(client_address)
                if now_idle:
                    self._on_idle()

    def active(self) -> int:
        return len(self._running)

    def queued(self) -> int:
        with self._lock:
            return max(0, self._outstanding - len(self._running))

    def idle(self) -> bool:
        return self._outstanding == 0

    def drain(self) -> None:
        pass  # queued requests still run: a graceful stop finishes them

    def force(self) -> int:
        """Cut off every running and waiting request; returns how many."""
        cut = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            request, client_address = item
            self.server.shutdown_request(request)  # type: ignore[attr-defined]
            with self._lock:
                self._outstanding -= 1
                self._waiting -= 1
            self.server.counters.finished(0.0, True)
            self.server.request_finished(client_address)
            cut += 1
        with self._lock:
            running = list(self._running)
        for request in running:
            if isinstance(request, socket.socket):
                shut(request, socket.SHUT_RDWR)  # wakes a handler blocked in recv/send
            cut += 1
        if self._outstanding == 0:
            self._on_idle()
        return cut

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def closed(self) -> bool:
        return not self._threads
