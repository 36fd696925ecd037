"""The fork pool: `workers` pre-forked processes per server, fed by the supervisor.

The supervisor accepts and verifies; an idle worker gets the connection over its channel (see
worker.py for the protocol) and answers when done, so the supervisor always knows which workers
are busy and queues at most `max_queue` connections for them. A worker that dies is reaped through
SIGCHLD and replaced; a worker that keeps dying at boot (before serving anything, within
BOOT_GRACE seconds) is replaced with exponential backoff, and after MAX_BOOT_FAILURES in a row the
pool gives up and its server is marked failed instead of crash-looping.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import scheduling
from .connections import Running, Task, Watchdog
from .listeners import ManagedMixIn
from .log import get_logger
from .timers import Timer
from .worker import (
    DONE_FAILED,
    HEARTBEAT,
    RETIRE_REASONS,
    Limits,
    send_request,
    worker_main,
)

log = get_logger()

BOOT_GRACE = 1.0
MAX_BOOT_FAILURES = 5
RESPAWN_FIRST = 0.1
RESPAWN_MAX = 10.0
KILL_GRACE = 2.0


class PoolHost(Protocol):
    """What a fork pool needs from the supervisor that owns the loop."""

    def fork_child(self, keep: set[int], child_main: Callable[[], None]) -> int: ...
    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...
    def own_pid(self, pid: int, on_exit: Callable[[int, int], None]) -> None: ...
    def pool_idle(self) -> None: ...
    def pool_failed(self, server: ManagedMixIn, reason: str) -> None: ...


class Worker:
    """The supervisor's view of one worker process."""

    __slots__ = (
        "busy",
        "channel",
        "client",
        "handed_at",
        "last_seen",
        "lost",
        "pid",
        "request",
        "retiring",
        "served",
        "started",
    )

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel: socket.socket | None = channel
        self.busy = False
        self.client: Any = None  # the address of the request it is running
        # Our copy of that request's socket, kept while it runs, for the watchdog to look at
        # and, past `timeout`, shut down; closed when the worker is done with it.
        self.request: socket.socket | None = None
        self.lost = False  # it went away in the middle of a request
        self.served = 0
        self.started = time.monotonic()
        self.handed_at = 0.0  # when the request it is running was handed over (monotonic)
        self.last_seen = time.monotonic()  # its last answer or heartbeat
        self.retiring: str | None = None  # why it is on its way out, when it is


class ForkPool:
    """Pre-forked workers for one server. Runs entirely in the loop's thread.

    Methods for the caller:

    - start(): fork the workers.
    - submit(request, client_address) -> bool: False when every worker is busy and the queue full.
    - active(), queued() -> int; idle() -> bool: nothing running and nothing queued.
    - close(): retire the workers (after a drain); closed() -> bool once all are reaped.
    - force() -> int: cut off queued and running requests, SIGTERM then SIGKILL the workers.
    - workers() -> list[Worker]
    """

    def __init__(self, server: ManagedMixIn, size: int, max_queue: int, host: PoolHost) -> None:
        self.server = server
        self.size = size
        self.max_queue = max_queue
        self.host = host
        self._workers: dict[int, Worker] = {}
        self._idle: collections.deque[Worker] = collections.deque()
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()
        self._boot_failures = 0
        self._closing = False
        self.failed = False
        config = server.config
        self.worker_timeout: float | None = getattr(config, "worker_timeout", None)
        self._max_requests: int | None = getattr(config, "max_requests", None)
        self._jitter: int = getattr(config, "max_requests_jitter", 0) or 0
        self._max_rss: int | None = getattr(config, "max_rss", None)
        self._policy = scheduling.PoolPolicy(server.name, config)
        self._health_timer: Timer | None = None
        self._watchdog = Watchdog.for_server(server, self._running, host.call_later)

    # -- workers ---------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()
        if self.worker_timeout:
            self._health_timer = self.host.call_later(self.worker_timeout / 2, self._check_health)

    def _limits(self) -> Limits:
        max_requests = self._max_requests
        if max_requests and self._jitter:
            # Spread the retirements, so that workers started together do not all restart
            # at the same moment.
            max_requests += random.randint(0, self._jitter)
        heartbeat = self.worker_timeout / 3 if self.worker_timeout else None
        return Limits(max_requests=max_requests, max_rss=self._max_rss, heartbeat=heartbeat)

    def _check_health(self) -> None:
        """Kill workers stuck on one request, or silent while idle, past worker_timeout."""
        self._health_timer = None
        if self._closing or not self.worker_timeout:
            return
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.retiring:
                continue
            if worker.busy and now - worker.last_seen > self.worker_timeout:
                self._kill_hung(worker, f"busy on one request for over {self.worker_timeout}s")
            elif not worker.busy and now - worker.last_seen > self.worker_timeout:
                self._kill_hung(worker, f"no heartbeat for over {self.worker_timeout}s")
        self._health_timer = self.host.call_later(self.worker_timeout / 2, self._check_health)

    def _kill_hung(self, worker: Worker, why: str) -> None:
        worker.retiring = "worker_timeout"
        log.warning("worker_hung", server=self.server.name, worker_pid=worker.pid, reason=why)
        _kill(worker.pid, signal.SIGTERM)
        self.host.call_later(KILL_GRACE, lambda: self._kill_if_alive(worker.pid))

    def _kill_if_alive(self, pid: int) -> None:
        if pid in self._workers:
            _kill(pid, signal.SIGKILL)

    def _spawn(self) -> None:
        if self._closing or self.failed:
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = self.server
        limits = self._limits()

        def child_main() -> None:
            # The worker's copy of the server must not lead a handler back to the supervisor
            # (self.server.dispatcher.host would be its copy of the control commands).
            server.dispatcher = None  # type: ignore[assignment]
            worker_main(server.run_request, server.connection, child_end, limits)

        try:
            pid = self.host.fork_child({child_end.fileno()}, child_main)
        finally:
            child_end.close()
        worker = Worker(pid, parent_end)
        self._workers[pid] = worker
        # The same uid as ours, so the loop may; a refused worker serves as it is.
        self._policy.apply(pid)
        self.host.own_pid(pid, self._on_exit)
        self.host.watch(parent_end.fileno(), lambda: self._on_channel(worker))
        log.info("worker_spawned", server=self.server.name, worker_pid=pid)
        self._make_idle(worker)

    def _make_idle(self, worker: Worker) -> None:
        worker.busy = False
        while self._pending and worker.channel is not None:
            request, client_address = self._pending.popleft()
            if self._handoff(worker, request, client_address):
                return
            self._pending.appendleft((request, client_address))
        if worker.channel is not None:
            self._idle.append(worker)
        if self.idle():
            self.host.pool_idle()

    def _handoff(self, worker: Worker, request: Any, client_address: Any) -> bool:
        assert worker.channel is not None
        try:
            send_request(worker.channel, request, client_address)
        except OSError:
            self._channel_closed(worker)
            return False
        worker.busy = True
        worker.client = client_address
        worker.handed_at = time.monotonic()
        if self._watchdog is not None:
            # Kept until the worker is done (the FIN comes from its shutdown, not our close).
            worker.request = request
            self._watchdog.arm()
        else:
            request.close()  # the worker has its own copy now; shutdown() would cut it off
        if self.worker_timeout:
            worker.last_seen = worker.handed_at  # from now on: busy since
        return True

    def _running(self) -> list[Running]:
        return [
            (w.request, w.client, w.handed_at, Task(w.pid, w.pid))
            for w in self._workers.values()
            if w.busy and w.request is not None
        ]

    @staticmethod
    def _release(worker: Worker) -> None:
        if worker.request is not None:
            worker.request.close()
            worker.request = None

    def _on_channel(self, worker: Worker) -> None:
        channel = worker.channel
        if channel is None:
            return
        try:
            data = channel.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._channel_closed(worker)
            return
        worker.last_seen = time.monotonic()
        if data == HEARTBEAT:
            return
        worker.served += 1
        worker.busy = False
        self._release(worker)
        self.server.counters.finished(time.monotonic() - worker.handed_at, data[:1] == DONE_FAILED)
        self.server.request_finished(worker.client)
        if len(data) > 1:
            # It finished its request and is retiring (max_requests, max_rss): its successor
            # starts now, while it exits.
            worker.retiring = RETIRE_REASONS.get(data[1], "retired")
            log.info(
                "worker_retiring",
                server=self.server.name,
                worker_pid=worker.pid,
                reason=worker.retiring,
                served=worker.served,
            )
            self._channel_closed(worker)
            self._spawn()
            return
        self._make_idle(worker)

    def _channel_closed(self, worker: Worker) -> None:
        """The worker is gone (or going): forget its channel; its request, if any, is lost."""
        if worker.channel is None:
            return
        self.host.unwatch(worker.channel.fileno())
        worker.channel.close()
        worker.channel = None
        try:
            self._idle.remove(worker)
        except ValueError:
            pass
        if worker.busy:
            worker.busy = False
            worker.lost = True
            self._release(worker)
            self.server.counters.finished(time.monotonic() - worker.handed_at, True)
            self.server.request_finished(worker.client)
        if self.idle():
            self.host.pool_idle()

    def _on_exit(self, pid: int, status: int) -> None:
        worker = self._workers.pop(pid, None)
        if worker is None:
            return
        self._channel_closed(worker)
        lost = worker.lost
        code = os.waitstatus_to_exitcode(status)
        fields: dict[str, Any] = {"server": self.server.name, "worker_pid": pid}
        fields["served"] = worker.served
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        else:
            fields["exit_code"] = code
        if lost:
            fields["lost_request"] = True
        if worker.retiring:
            fields["reason"] = worker.retiring
        expected = (self._closing or worker.retiring in RETIRE_REASONS.values()) and code == 0
        (log.info if expected else log.warning)("worker_exited", **fields)
        if self._closing:
            if not self._workers:
                self.host.pool_idle()
            return
        if worker.retiring in RETIRE_REASONS.values():
            return  # its successor was started when it announced its retirement
        self._replace(worker)

    def _replace(self, worker: Worker) -> None:
        lived = time.monotonic() - worker.started
        if lived < BOOT_GRACE and worker.served == 0 and not worker.retiring:
            self._boot_failures += 1
        else:
            self._boot_failures = 0
        if self._boot_failures >= MAX_BOOT_FAILURES:
            self._fail(f"{self._boot_failures} workers in a row died at boot")
            return
        if self._boot_failures == 0:
            self._spawn()
            return
        delay = min(RESPAWN_MAX, RESPAWN_FIRST * 2 ** (self._boot_failures - 1))
        self.host.call_later(delay, self._spawn)

    def _fail(self, reason: str) -> None:
        self.failed = True
        self._drop_pending()
        self.host.pool_failed(self.server, reason)

    def _drop_pending(self) -> int:
        dropped = 0
        while self._pending:
            request, client_address = self._pending.popleft()
            self.server.shutdown_request(request)  # type: ignore[attr-defined]
            self.server.counters.finished(0.0, True)
            self.server.request_finished(client_address)
            dropped += 1
        return dropped

    # -- dispatch ----------------------------------------------------------------------------

    def submit(self, request: Any, client_address: Any) -> bool:
        if self.failed or self._closing:
            return False
        while self._idle:
            worker = self._idle.popleft()
            if self._handoff(worker, request, client_address):
                return True
        if len(self._pending) < self.max_queue:
            self._pending.append((request, client_address))
            return True
        return False

    def active(self) -> int:
        return sum(1 for w in self._workers.values() if w.busy)

    def queued(self) -> int:
        return len(self._pending)

    def idle(self) -> bool:
        return not self._pending and not any(w.busy for w in self._workers.values())

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def drain(self) -> None:
        pass  # queued connections still go to workers: a graceful stop finishes them

    # -- stopping ----------------------------------------------------------------------------

    def close(self) -> None:
        """Retire every worker: each reads EOF on its channel and exits 0."""
        self._closing = True
        self._stop_timers()
        for worker in list(self._workers.values()):
            self._channel_closed(worker)
        if not self._workers:
            self.host.pool_idle()

    def closed(self) -> bool:
        return self._closing and not self._workers

    def _stop_timers(self) -> None:
        if self._health_timer is not None:
            self._health_timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def force(self) -> int:
        """Cut off what is queued and running; SIGTERM every worker, SIGKILL the stragglers."""
        self._closing = True
        self._stop_timers()
        cut = self._drop_pending() + self.active()
        for worker in list(self._workers.values()):
            self._channel_closed(worker)
            _kill(worker.pid, signal.SIGTERM)
        if self._workers:
            self.host.call_later(KILL_GRACE, self._kill_stragglers)
        return cut

    def _kill_stragglers(self) -> None:
        for pid in list(self._workers):
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
