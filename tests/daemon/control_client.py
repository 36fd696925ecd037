"""Helpers for the control socket tests: a JSON-lines client, config text, test handlers.

- ControlClient(path): one connection; call(command, **args) sends a request, returns the reply.
- result(path, command, **args): one connection per request; asserts ok, returns the result.
- error(path, command, **args): asserts the reply is an error, returns its message.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import psutil
import tomli_w

HANDLERS = '''
import socketserver


class Fail(socketserver.StreamRequestHandler):
    """Fails every request."""

    def handle(self):
        line = self.rfile.readline()
        raise ValueError("boom: " + line.decode().strip())


class Greeting(socketserver.StreamRequestHandler):
    """Answers each line with options.greeting, a space and the line, until EOF.

    The greeting shows which settings a request runs with: those of the server object (and
    so of the pool) that took the connection.
    """

    def handle(self):
        greeting = self.server.options["greeting"]
        while line := self.rfile.readline():
            self.wfile.write(greeting.encode() + b" " + line)
'''

HANDLER_MODULE = "controltesthandlers"


def write_handlers(directory: Path) -> str:
    """Write the handler module where the daemon imports from (tmp_path); its module name."""
    (directory / f"{HANDLER_MODULE}.py").write_text(HANDLERS)
    return HANDLER_MODULE


def daemon_config(control_socket: str | Path, **extra: Any) -> str:
    """A [daemon] table with this control socket, JSON logs at debug level."""
    keys: dict[str, Any] = {
        "control_socket": str(control_socket),
        "log_format": "json",
        "log_level": "debug",
    }
    keys.update(extra)
    return tomli_w.dumps({"daemon": keys})


def server_section(name: str, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: keys}})


def control_path(tmp_path: Path) -> str:
    """Where tests.conftest.daemon_section(tmp_path) puts the control socket."""
    return f"{tmp_path}/control.sock"


class ControlClient:
    """One connection to a control socket, speaking JSON lines."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, command: Any, **args: Any) -> None:
        self.send_raw(json.dumps({"command": command, **args}).encode() + b"\n")

    def read_line(self) -> bytes:
        """One raw reply line; b"" once the daemon has closed the connection."""
        return self._file.readline()

    def reply(self) -> dict[str, Any]:
        line = self.read_line()
        assert line.endswith(b"\n"), f"connection closed instead of a reply: {line!r}"
        value = json.loads(line)
        assert isinstance(value, dict) and isinstance(value.get("ok"), bool), value
        return value

    def call(self, command: Any, **args: Any) -> dict[str, Any]:
        self.send(command, **args)
        return self.reply()

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(path: str | Path, command: str, **args: Any) -> dict[str, Any]:
    with ControlClient(path) as client:
        return client.call(command, **args)


def result(path: str | Path, command: str, **args: Any) -> Any:
    reply = call(path, command, **args)
    assert reply["ok"] is True, reply
    return reply["result"]


def error(path: str | Path, command: str, **args: Any) -> str:
    reply = call(path, command, **args)
    assert reply["ok"] is False, reply
    assert isinstance(reply["error"], str) and reply["error"], reply
    return reply["error"]


def server_status(path: str | Path, name: str) -> dict[str, Any]:
    return result(path, "status", server=name)["servers"][name]


def servers_status(path: str | Path) -> dict[str, Any]:
    return result(path, "status")["servers"]


def held_connection(port: int, timeout: float = 10.0) -> socket.socket:
    """A connection to an echo-like server whose first line has been answered: from now on it
    is a request in flight, until the test closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        assert echo_on(sock, b"first\n") == b"first\n"
    except BaseException:
        sock.close()
        raise
    return sock


def echo_on(sock: socket.socket, line: bytes) -> bytes:
    """Send `line` on an open connection and read one line back."""
    sock.sendall(line)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def listener_inode(pid: int, port: int) -> int:
    """The inode of the socket `pid` listens on at 127.0.0.1:`port` (same inode: same socket)."""
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            st = os.stat(f"/proc/{pid}/fd/{conn.fd}")
            assert stat.S_ISSOCK(st.st_mode)
            return st.st_ino
    raise AssertionError(f"pid {pid} does not listen on port {port}")
