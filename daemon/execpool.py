"""Exec services, inetd's classic model: a program per connection, or per datagram burst.

Stream (nowait): each accepted connection becomes the stdin and stdout of a new process running
`command`, in its own process group, with REMOTE_ADDR, REMOTE_PORT (systemd's Accept=yes
convention) and SERVER_NAME in its environment, plus `env` and the daemon's variables named in
`passenv`. Its stderr comes back to the daemon on a pipe and is logged line by line.

Datagram (wait): the program gets the listening socket itself as stdin and reads the datagrams;
the listener leaves the selector until the program exits, as inetd's `wait` services do.

The child is forked by hand rather than through subprocess: between fork and exec it only moves
descriptors, applies the service's rlimits, scheduling policy and identity and resets SIGPIPE
(which Python ignores and a program expects at its default), all C calls on the child's own
memory. Children are reaped through the supervisor's SIGCHLD path; on a graceful stop they get
SIGTERM, and SIGKILL once the shutdown timeout forces.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import scheduling
from .config import ServerConfig
from .config_schema import key_path
from .listeners import ManagedMixIn
from .log import format_address, get_logger
from .privileges import Identity, resolve

log = get_logger()

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_STDERR_LINE = 4096


class ExecHost(Protocol):
    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def own_pid(self, pid: int, on_exit: Callable[[int, int], None]) -> None: ...
    def pool_idle(self) -> None: ...


def child_environment(config: ServerConfig, client_address: Any) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH}
    for name in config.passenv:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(config.env)
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        env["REMOTE_ADDR"] = str(client_address[0])
        env["REMOTE_PORT"] = str(client_address[1])
    env["SERVER_NAME"] = config.name
    return env


def spawn(
    config: ServerConfig, identity: Identity | None, stdio_fd: int, client_address: Any
) -> tuple[int, int]:
    """Start `config.command` on `stdio_fd`; (pid, read end of its stderr pipe)."""
    env = child_environment(config, client_address)
    argv = list(config.command or ())
    limits = [
        (resource.RLIMIT_CPU, config.rlimit_cpu),
        (resource.RLIMIT_NOFILE, config.rlimit_nofile),
        (resource.RLIMIT_AS, config.rlimit_as),
    ]
    err_r, err_w = os.pipe()
    os.set_inheritable(err_r, False)
    # The loop reads it: a read must never wait, even once the program has exited while
    # something it started in the background still holds the write end.
    os.set_blocking(err_r, False)
    try:
        pid = os.fork()
    except OSError:
        os.close(err_r)
        os.close(err_w)
        raise
    if pid:
        os.close(err_w)
        return pid, err_r
    try:
        os.setpgid(0, 0)
        os.dup2(stdio_fd, 0)
        os.dup2(stdio_fd, 1)
        os.dup2(err_w, 2)
        # A program expects a blocking socket, as inetd gives it; in wait mode this is the
        # daemon's own listener, which the daemon makes non-blocking again once it has exited.
        os.set_blocking(0, True)
        os.closerange(3, 2**31 - 1)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for which, value in limits:
            if value is not None:
                resource.setrlimit(which, (value, value))
        if why := scheduling.apply(config.scheduling_policy):
            # The program runs all the same; the line is logged as its stderr (exec_stderr).
            os.write(2, f"selectd: scheduling_policy {config.scheduling_policy}: {why}\n".encode())
        if config.cwd:
            os.chdir(config.cwd)
        if identity is not None and os.geteuid() == 0:
            os.setgroups([identity.gid])
            os.setgid(identity.gid)
            os.setuid(identity.uid)
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        try:
            os.write(2, f"selectd: cannot run {argv[0]!r}: {exc}\n".encode())
        finally:
            os._exit(127)
    raise AssertionError("unreachable")  # pragma: no cover


class Child:
    __slots__ = ("client", "pid", "started", "stderr", "stderr_fd")

    def __init__(self, pid: int, stderr_fd: int, client: Any) -> None:
        self.pid = pid
        self.stderr_fd: int | None = stderr_fd
        self.stderr = bytearray()
        self.client = client
        self.started = time.monotonic()


class ExecDispatcher:
    """Runs a program per request for one server (the Dispatcher protocol, plus wait mode).

    Methods for the caller:

    - submit(request, client_address) -> bool: start the program on the connection.
    - serve_socket(sock, done): wait mode; run the program on the listening socket itself and
      call done(exit code, seconds it ran) when it exits.
    - drain(): SIGTERM every child (a graceful stop); force(): SIGKILL them.
    """

    def __init__(self, server: ManagedMixIn, host: ExecHost) -> None:
        self.server = server
        self.config = server.config
        self.host = host
        table = key_path("servers", self.config.name)
        self.identity = resolve(self.config.user, self.config.group, table)
        self._children: dict[int, Child] = {}
        self._closing = False

    def submit(self, request: Any, client_address: Any) -> bool:
        if self._closing:
            return False
        self._start(request.fileno(), client_address, on_exit=None)
        request.close()  # the child has it now
        return True

    def serve_socket(self, sock: socket.socket, done: Callable[[int, float], None]) -> None:
        self._start(sock.fileno(), None, on_exit=done)

    def _start(self, fd: int, client: Any, on_exit: Callable[[int, float], None] | None) -> None:
        pid, stderr_fd = spawn(self.config, self.identity, fd, client)
        child = Child(pid, stderr_fd, client)
        self._children[pid] = child
        self.host.watch(stderr_fd, lambda: self._on_stderr(child))
        self.host.own_pid(pid, lambda _pid, status: self._on_exit(child, status, on_exit))
        log.debug(
            "exec_started",
            server=self.config.name,
            child_pid=pid,
            client=format_address(client) if client else None,
        )

    def _on_stderr(self, child: Child) -> bool:
        """Read what the program wrote to stderr; True when there may be more right now."""
        fd = child.stderr_fd
        if fd is None:
            return False
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if data:
            child.stderr += data
            *lines, rest = child.stderr.split(b"\n")
            child.stderr = bytearray(rest[-MAX_STDERR_LINE:])
            for line in lines:
                self._log_line(child, bytes(line))
            return True
        if child.stderr:
            self._log_line(child, bytes(child.stderr))
            child.stderr.clear()
        self.host.unwatch(fd)
        os.close(fd)
        child.stderr_fd = None
        return False

    def _log_line(self, child: Child, line: bytes) -> None:
        log.warning(
            "exec_stderr",
            server=self.config.name,
            child_pid=child.pid,
            line=line[:MAX_STDERR_LINE].decode("utf-8", "replace").rstrip("\r"),
        )

    def _on_exit(
        self, child: Child, status: int, on_exit: Callable[[int, float], None] | None
    ) -> None:
        self._children.pop(child.pid, None)
        if child.stderr_fd is not None:
            while self._on_stderr(child):  # what it wrote last
                pass
            if child.stderr_fd is not None:  # held open by something it left running
                self.host.unwatch(child.stderr_fd)
                os.close(child.stderr_fd)
                child.stderr_fd = None
        code = os.waitstatus_to_exitcode(status)
        duration = time.monotonic() - child.started
        fields: dict[str, Any] = {"server": self.config.name, "child_pid": child.pid}
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        else:
            fields["exit_code"] = code
        (log.info if code == 0 else log.warning)(
            "exec_exited", duration=round(duration, 6), **fields
        )
        self.server.counters.finished(duration, code != 0)
        self.server.request_finished(child.client)
        if on_exit is not None:
            on_exit(code, duration)
        if not self._children:
            self.host.pool_idle()

    def active(self) -> int:
        return len(self._children)

    def queued(self) -> int:
        return 0

    def idle(self) -> bool:
        return not self._children

    def drain(self) -> None:
        """A graceful stop: ask every child to finish (SIGTERM to its process group)."""
        self._closing = True
        for pid in list(self._children):
            _killpg(pid, signal.SIGTERM)

    def force(self) -> int:
        self._closing = True
        for pid in list(self._children):
            _killpg(pid, signal.SIGKILL)
        return len(self._children)

    def close(self) -> None:
        self._closing = True

    def closed(self) -> bool:
        return self._closing and not self._children


def _killpg(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
