"""The control socket: JSON lines over a Unix stream socket, served by the supervisor's loop.

It is a server like the others, built on servers.UnixStreamServer, with one difference: a control
connection is never handed to a handler that could block. Each accepted connection is made
non-blocking and watched by the loop; lines are read as they arrive and replies are written as the
peer takes them. So a slow or stuck client costs only its own connection: a request line longer
than MAX_LINE, or replies piling up past MAX_OUTPUT because the client does not read them, close it.

Protocol: one JSON object per line each way. Request {"command": "NAME", ...arguments}; reply
{"ok": true, "result": ...} or {"ok": false, "error": "message"}. Several requests may share a
connection; replies come in order.

Access: the socket is created mode 0600 (bound under umask 0o177, never chmod afterwards), in a
directory created 0700 if missing, and every peer's credentials are checked (SO_PEERCRED): only
the daemon's own uid and root are served.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import servers

from .errors import DaemonError
from .listeners import probe_unix_path
from .log import get_logger

log = get_logger()

MAX_LINE = 64 * 1024
MAX_OUTPUT = 4 * 1024 * 1024
# Flow control: at most this many requests are handled per readiness event, and none while
# this much output waits for the client to read it.
LINES_PER_EVENT = 32
OUTPUT_HIGH_WATER = 64 * 1024
# A client whose pending replies see no progress for this long is not reading: cut it off.
STALL_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class CommandError(Exception):
    """A request that cannot be carried out; its message becomes the error reply."""


class ControlHost(Protocol):
    """What the control server needs from the loop that serves it."""

    def watch(self, fd: int, callback: Callable[[], None], events: int = ...) -> None: ...
    def rewatch(self, fd: int, events: int) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Any: ...


Command = Callable[[dict[str, Any]], Any]


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return uid


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory (0700) and clear a stale socket; refuse a live one."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    state = probe_unix_path(path)
    if state == "absent":
        return
    if state == "stale":
        os.unlink(path)  # nobody listens: left behind by a daemon that died
        return
    if state == "live":
        raise DaemonError(f"control socket {path}: another selectd is running and answering there")
    if state == "not a socket":
        raise DaemonError(
            f"control socket {path}: exists and is not a socket; refusing to replace it"
        )
    if state == "other kind":
        raise DaemonError(f"control socket {path}: exists and is not a stream socket")
    raise DaemonError(f"control socket {path}: {state.removeprefix('error: ')}")


class ControlServer(servers.UnixStreamServer):
    """The control socket's listener; each connection becomes a ControlConnection in the loop."""

    request_queue_size = 64

    def __init__(
        self,
        path: str,
        host: ControlHost,
        commands: dict[str, Command],
        inherited: socket.socket | None = None,
    ) -> None:
        self.host = host
        self.commands = commands
        self.connections: set[LoopConnection] = set()
        self.denied = 0
        if inherited is not None:  # taking over from the daemon we upgrade
            super().__init__(path, servers.BaseRequestHandler, bind_and_activate=False)
            self.adopt_socket(inherited)
            return
        prepare_socket_path(path)
        previous = os.umask(0o177)
        try:
            super().__init__(path, servers.BaseRequestHandler)
        finally:
            os.umask(previous)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        uid = peer_uid(request)
        if uid in (0, os.getuid()):
            return True
        self.denied += 1
        log.warning("control_denied", uid=uid)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        request.setblocking(False)
        ControlConnection(request, self)

    def server_close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        super().server_close()


class LoopConnection:
    """A non-blocking connection served by the loop: buffered replies, never a blocking call.

    Subclasses implement received(data). send() queues bytes and writes what the peer takes;
    the rest waits for EVENT_WRITE. Output piling up past MAX_OUTPUT (a peer that does not
    read), or no activity for `idle_timeout` seconds, closes the connection.
    """

    idle_timeout = 300.0

    def __init__(self, sock: socket.socket, host: ControlHost, registry: set[Any]) -> None:
        self._sock = sock
        self._host = host
        self._registry = registry
        self._outbuf = bytearray()
        self._closing = False
        self._watching_write = False
        self._last_activity = time.monotonic()
        self._sent_total = 0
        self._stall_timer: Any = None
        registry.add(self)
        host.watch(sock.fileno(), self.on_ready)
        host.call_later(self.idle_timeout, self._check_idle)

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def has_pending_input(self) -> bool:
        """Input already read but not yet handled (flow control held it back)."""
        return False

    def on_ready(self) -> None:
        self._last_activity = time.monotonic()
        if self._outbuf:
            self._flush()
        if self._sock.fileno() < 0 or self._closing:
            return
        if self.has_pending_input():
            # Finish what was read before reading more: a client that floods requests gets
            # them answered at the pace it takes the replies, never all in one loop turn.
            self.received(b"")
            self._update_interest()
            return
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.received(data)

    def _check_idle(self) -> None:
        if self._sock.fileno() < 0:
            return
        idle = time.monotonic() - self._last_activity
        if idle >= self.idle_timeout:
            self.close()
        else:
            self._host.call_later(self.idle_timeout - idle, self._check_idle)

    def send(self, data: bytes) -> None:
        self._outbuf += data
        if len(self._outbuf) > MAX_OUTPUT:
            self._not_reading()
            return
        self._flush()

    def _not_reading(self) -> None:
        log.warning("client_not_reading", pending=len(self._outbuf))
        self.close()

    def _check_stall(self, mark: int) -> None:
        self._stall_timer = None
        if self._sock.fileno() < 0 or not self._outbuf:
            return
        if self._sent_total == mark:
            self._not_reading()
        else:
            self._watch_stall()

    def _watch_stall(self) -> None:
        if self._stall_timer is None:
            mark = self._sent_total
            self._stall_timer = self._host.call_later(
                STALL_TIMEOUT, lambda: self._check_stall(mark)
            )

    def close_when_sent(self) -> None:
        self._closing = True
        self._flush()

    def _flush(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            while self._outbuf:
                sent = self._sock.send(self._outbuf)
                del self._outbuf[:sent]
                self._sent_total += sent
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        if not self._outbuf and self._closing:
            self.close()
            return
        if self._outbuf:
            self._watch_stall()
        self._update_interest()

    def _update_interest(self) -> None:
        """Watch for writability while there is output to send or held-back input to handle."""
        if self._sock.fileno() < 0:
            return
        want = bool(self._outbuf) or self.has_pending_input()
        if want != self._watching_write:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._host.rewatch(self._sock.fileno(), events)
            self._watching_write = want

    def close(self) -> None:
        self._closing = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._sock.fileno() >= 0:
            self._host.unwatch(self._sock.fileno())
            self._sock.close()
        self._registry.discard(self)


class ControlConnection(LoopConnection):
    """One control client: request lines in, reply lines out, in order."""

    def __init__(self, sock: socket.socket, server: ControlServer) -> None:
        self._server = server
        self._inbuf = bytearray()
        super().__init__(sock, server.host, server.connections)

    def received(self, data: bytes) -> None:
        self._inbuf += data
        for _ in range(LINES_PER_EVENT):
            if self._closing or len(self._outbuf) > OUTPUT_HIGH_WATER:
                break
            end = self._inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._inbuf[:end])
            del self._inbuf[: end + 1]
            self._reply(self._answer(line))
        if b"\n" not in self._inbuf and len(self._inbuf) > MAX_LINE and not self._closing:
            self._reply({"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
            self._inbuf.clear()
            self.close_when_sent()

    def has_pending_input(self) -> bool:
        return not self._closing and b"\n" in self._inbuf

    def _answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            return {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
        try:
            request = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return {"ok": False, "error": "request is not valid UTF-8"}
        except ValueError as exc:
            return {"ok": False, "error": f"request is not valid JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        name = request.get("command")
        if not isinstance(name, str):
            return {"ok": False, "error": 'request needs a "command" string'}
        command = self._server.commands.get(name)
        if command is None:
            known = ", ".join(sorted(self._server.commands))
            return {"ok": False, "error": f"unknown command {name!r}; commands: {known}"}
        try:
            return {"ok": True, "result": command(request)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in a command must not take the daemon down
            log.error("control_command_failed", command=name, exc_info=True)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _reply(self, reply: dict[str, Any]) -> None:
        self.send(json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n")
