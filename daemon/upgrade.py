"""Zero-downtime upgrade: hand every listening socket to a new copy of the daemon.

SIGUSR2 (or `selectctl upgrade`) starts a successor: the same command line (sys.orig_argv) run
again, so a newly installed version takes over. It inherits every listening socket, the control
socket and the metrics socket through the socket-activation convention it already understands
(LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, descriptors from 3 on), plus one pipe on which it
writes READY once it serves. Until then the old daemon keeps accepting, so the sockets are never
without a reader: the kernel queues new connections and whichever process is accepting takes
them. Once the successor is ready, the old daemon stops accepting without closing anything for
good (the successor holds the same sockets), drains its in-flight requests and exits.

If the successor fails to become ready (it exits, closes the pipe, or says nothing within
READY_TIMEOUT), the old daemon kills it if needed, logs why, and carries on.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from .errors import DaemonError
from .log import get_logger

log = get_logger()

READY_FD_ENV = "SELECTD_READY_FD"
UPGRADE_FROM_ENV = "SELECTD_UPGRADE_FROM"
READY_TIMEOUT = 30.0
CONTROL_NAME = "selectd-control"
METRICS_NAME = "selectd-metrics"
SERVER_PREFIX = "selectd-server."


def spawn_successor(sockets: list[tuple[str, socket.socket]]) -> tuple[int, int]:
    """Fork and exec the successor with `sockets` as its LISTEN_FDS; (pid, ready pipe's read end).

    The child does nothing between fork and exec but move descriptors and build its
    environment: no locks, no logging, no Python objects of the parent's touched.
    """
    ready_r, ready_w = os.pipe()
    os.set_inheritable(ready_r, False)
    argv = [sys.executable, *sys.orig_argv[1:]]
    names = ":".join(name for name, _sock in sockets)
    fds = [sock.fileno() for _name, sock in sockets]
    environ = dict(os.environ)
    pid = os.fork()
    if pid:
        os.close(ready_w)
        return pid, ready_r
    try:
        # Move every descriptor out of the way first, then down to 3, 4, ...: a plain dup2
        # loop could overwrite a descriptor it has yet to move.
        high = max([*fds, ready_w, 2]) + 1
        moved = [os.dup2(fd, high + i, inheritable=False) for i, fd in enumerate([*fds, ready_w])]
        for i, fd in enumerate(moved):
            os.dup2(fd, 3 + i, inheritable=True)
        os.closerange(3 + len(moved), 2**31 - 1)
        environ.update(
            LISTEN_FDS=str(len(fds)),
            LISTEN_FDNAMES=names,
            LISTEN_PID=str(os.getpid()),
            **{READY_FD_ENV: str(3 + len(fds)), UPGRADE_FROM_ENV: str(os.getppid())},
        )
        # The successor speaks to systemd as well: READY once it serves (while we are still
        # the main process, only its STATUS shows), then, as the main process once we have
        # said MAINPID, the watchdog pings, RELOADING and STOPPING. systemd named our pid in
        # WATCHDOG_PID; from the successor's start the pings are its to send too.
        if "WATCHDOG_PID" in environ:
            environ["WATCHDOG_PID"] = str(os.getpid())
        os.execve(argv[0], argv, environ)
    finally:
        os._exit(127)


def report_ready() -> None:
    """In the successor, once it serves: tell the old daemon, if there is one."""
    fd_text = os.environ.pop(READY_FD_ENV, "")
    os.environ.pop(UPGRADE_FROM_ENV, None)
    if not fd_text.isdigit():
        return
    fd = int(fd_text)
    try:
        os.write(fd, b"READY\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def predecessor() -> int | None:
    """The pid of the daemon we are taking over from, if this start is an upgrade."""
    text = os.environ.get(UPGRADE_FROM_ENV, "")
    return int(text) if text.isdigit() else None


class PendingUpgrade:
    """The old daemon's side while the successor starts.

    `on_ready()` runs once the successor says READY; `on_failed(reason)` when it cannot.
    """

    def __init__(
        self,
        pid: int,
        ready_fd: int,
        unwatch: Callable[[int], None],
        on_ready: Callable[[int], None],
        on_failed: Callable[[str], None],
    ) -> None:
        self.pid = pid
        self.ready_fd = ready_fd
        self._unwatch = unwatch
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._buffer = b""
        self.done = False

    def readable(self) -> None:
        try:
            data = os.read(self.ready_fd, 64)
        except (BlockingIOError, InterruptedError):
            return
        self._buffer += data
        if b"READY" in self._buffer:
            self._finish()
            self._on_ready(self.pid)
        elif not data:
            self.fail("the new process closed its ready pipe without becoming ready")

    def exited(self, status: int) -> None:
        if not self.done:
            code = os.waitstatus_to_exitcode(status)
            self.fail(f"the new process exited ({code}) before it became ready")

    def timed_out(self) -> None:
        if not self.done:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.fail(f"the new process was not ready within {READY_TIMEOUT:.0f}s")

    def fail(self, reason: str) -> None:
        if self.done:
            return
        self._finish()
        self._on_failed(reason)

    def _finish(self) -> None:
        self.done = True
        self._unwatch(self.ready_fd)
        try:
            os.close(self.ready_fd)
        except OSError:
            pass


class UpgradeMixIn:
    """The old daemon's side of an upgrade, mixed into the Supervisor (which provides the loop
    plumbing: watch, unwatch, own_pid, call_later, begin_shutdown, and the attributes below)."""

    phase: Any
    units: dict[str, Any]
    control: Any
    metrics_server: Any
    notifier: Any
    _pids: dict[int, Any]
    _pending_upgrade: PendingUpgrade | None
    _handing_off: bool
    watch: Callable[..., None]
    unwatch: Callable[[int], None]
    own_pid: Callable[[int, Callable[[int, int], None]], None]
    call_later: Callable[[float, Callable[[], None]], Any]
    begin_shutdown: Callable[..., None]

    def _on_sigusr2(self) -> None:
        try:
            self.upgrade()
        except DaemonError as exc:
            log.error("upgrade_failed", reason=str(exc))

    def upgrade(self) -> int:
        """Start a successor with every listening socket; it takes over once ready. Its pid."""
        if self.phase.value != "running":
            raise DaemonError(f"cannot upgrade while {self.phase.value}")
        if self._pending_upgrade is not None:
            raise DaemonError(f"an upgrade is under way (new pid {self._pending_upgrade.pid})")
        sockets: list[tuple[str, socket.socket]] = []
        for unit in self.units.values():
            if unit.server is not None:
                listen = unit.config.listen
                name = listen.name if listen.kind == "systemd" else SERVER_PREFIX + unit.name
                sockets.append((name, unit.server.socket))
        if self.control is not None:
            sockets.append((CONTROL_NAME, self.control.socket))
        if self.metrics_server is not None:
            sockets.append((METRICS_NAME, self.metrics_server.socket))
        try:
            pid, ready_fd = spawn_successor(sockets)
        except OSError as exc:
            raise DaemonError(f"cannot start the new process: {exc.strerror or exc}") from exc
        pending = PendingUpgrade(
            pid, ready_fd, self.unwatch, self._upgrade_ready, self._upgrade_failed
        )
        self._pending_upgrade = pending
        self.watch(ready_fd, pending.readable)
        self.own_pid(pid, lambda _pid, status: pending.exited(status))
        self.call_later(READY_TIMEOUT, pending.timed_out)
        log.info("upgrade_begun", new_pid=pid)
        return pid

    def _upgrade_ready(self, pid: int) -> None:
        log.info("upgrade_ready", new_pid=pid)
        self.notifier.mainpid(pid)
        # The successor is a child of ours only by accident of fork: once we exit it belongs to
        # init (or systemd); we must not wait for it, nor reap it as a worker.
        self._pids.pop(pid, None)
        self._pending_upgrade = None
        self._handing_off = True
        if self.control is not None:
            self.control.disown_path()
        if self.metrics_server is not None:
            self.unwatch(self.metrics_server.fileno())
            self.metrics_server.server_close()
            self.metrics_server = None
        self.begin_shutdown()

    def _upgrade_failed(self, reason: str) -> None:
        log.error("upgrade_failed", reason=reason)
        self._pending_upgrade = None
