"""Helpers for the servers tests: real loopback sockets, real threads, real processes.

A module of its own (not conftest.py) so that test modules can import it by a name no other test
directory uses. `wait_for(predicate, timeout)` is how every test synchronises: poll a condition
with a short sleep and a deadline, never a bare sleep.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

import servers

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.005,
    message: str | Callable[[], str] = "",
) -> T:
    """Return predicate()'s first truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text or predicate}")
        time.sleep(interval)


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what they point at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir() itself used, closed by now
    return fds


def children(ppid: int | None = None) -> dict[int, str]:
    """pid -> state letter ('S', 'R', 'Z', ...) of every process whose parent is `ppid`."""
    ppid = os.getpid() if ppid is None else ppid
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        state, parent = stat.rpartition(")")[2].split()[:2]
        if int(parent) == ppid:
            found[int(name)] = state
    return found


def ctxt_switches(tid: int) -> int:
    """Voluntary context switches of thread `tid` of this process so far."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for task {tid}")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 on loopback")


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's `servers`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return env


def free_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LogRecords(logging.Handler):
    """Keeps every record it sees; attach it to the "servers" logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        """Messages of the records at WARNING and above."""
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


class LineEchoHandler(servers.StreamRequestHandler):
    """Reads one line, answers it upper-cased: one request, one reply, then the server closes."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class DatagramUpperHandler(servers.DatagramRequestHandler):
    """Answers each datagram upper-cased."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


def line_request(address: Any, line: bytes = b"ping\n", timeout: float = 5.0) -> bytes:
    """Connect to a stream server, send one line, return everything it sends until it closes."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(address)
        client.sendall(line)
        return recv_until_eof(client)


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Serving:
    server: Any
    thread: threading.Thread

    @property
    def native_id(self) -> int:
        assert self.thread.native_id is not None
        return self.thread.native_id


@dataclass
class Harness:
    """Servers built here are closed at teardown; serve() runs serve_forever() in a thread."""

    made: list[Any] = field(default_factory=list)
    running: list[Serving] = field(default_factory=list)

    def make(self, cls: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        server = cls(*args, **kwargs)
        self.made.append(server)
        return server

    def serve(self, server: Any) -> Serving:
        if server not in self.made:
            self.made.append(server)
        thread = threading.Thread(
            target=server.serve_forever, name=f"serve {server.server_address}", daemon=True
        )
        thread.start()
        serving = Serving(server, thread)
        self.running.append(serving)
        return serving

    def close(self) -> None:
        for serving in self.running:
            if serving.thread.is_alive():
                serving.server.shutdown()
            serving.thread.join(5)
            assert not serving.thread.is_alive(), f"serve_forever did not stop: {serving}"
        for server in self.made:
            server.server_close()


def run_python(
    args: list[str], timeout: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a child Python with this checkout importable; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
