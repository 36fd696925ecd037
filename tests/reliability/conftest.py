"""Shared pieces of the reliability suite: the soak gate, daemons, handlers and measurements.

Every test here runs a real selectd process on loopback and hurts it in one way (crashing
handlers, stalled clients, descriptor exhaustion, floods, bad input, signals mid-request), then
checks that only the hurt request paid for it. They wait on events and deadlines, never on
fixed sleeps; where a test needs something to happen *during* a window (a signal while requests
are in flight) the window is opened by a handler that sleeps, not by the test.

Soak tests (`@pytest.mark.soak`) run for minutes: they are skipped unless `-m soak` selects them
or SELECTD_SOAK=1 is set.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from tests.conftest import Daemon, wait_for

__all__ = [
    "HANDLERS_MODULE",
    "LimitedDaemon",
    "ask",
    "cpu_seconds",
    "p99",
    "raise_nofile",
    "round_trips",
    "server_section",
    "short_tempdir",
    "status",
    "stop_and_reap",
    "write_handlers",
]

# -- the soak gate ---------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip soak tests unless asked for: `-m soak` (any -m naming soak) or SELECTD_SOAK=1."""
    if "soak" in (config.getoption("markexpr", "") or "") or os.environ.get("SELECTD_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or SELECTD_SOAK=1")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


# -- handlers the tests load into the daemon ---------------------------------------------------

HANDLERS_MODULE = "relhandlers"

HANDLERS = '''
"""Request handlers for the reliability tests (written into the test's tmp_path)."""

import json
import os
import select
import selectors
import socket
import socketserver
import threading
import time


class Crashy(socketserver.StreamRequestHandler):
    """One line in, the same line out, unless the line asks for a way to fail.

    raise: ValueError. exit: SystemExit(3). _exit: os._exit(7) (kills a fork worker).
    hang: answers its pid, then sleeps (to be killed). slow...: sleeps options.delay first.
    """

    def handle(self):
        line = self.rfile.readline()
        word = line.strip()
        if word == b"raise":
            raise ValueError("boom")
        if word == b"exit":
            raise SystemExit(3)
        if word == b"_exit":
            os._exit(7)
        if word == b"hang":
            self.wfile.write(f"{os.getpid()}\\n".encode())
            time.sleep(60)
        if word.startswith(b"slow"):
            time.sleep(float(self.server.options.get("delay", 0.5)))
        self.wfile.write(line)


class SlowEcho(socketserver.StreamRequestHandler):
    """Echoes one line after options.delay seconds."""

    def handle(self):
        line = self.rfile.readline()
        time.sleep(float(self.server.options.get("delay", 0.1)))
        self.wfile.write(line)


class SlowLines(socketserver.StreamRequestHandler):
    """Echoes each line after options.delay seconds, spent as options.wait says: "sleep";
    waiting for a backend that does not answer, with a socket timeout ("poll"), select.select
    ("select") or a selectors.EpollSelector ("epoll"); or "read" (a blocking read of a pipe
    that a timer writes to)."""

    def handle(self):
        delay = float(self.server.options.get("delay", 0.5))
        wait = self.server.options.get("wait", "sleep")
        while line := self.rfile.readline():
            if wait == "sleep":
                time.sleep(delay)
            elif wait in ("poll", "select", "epoll"):
                backend, other = socket.socketpair()
                with backend, other:
                    if wait == "select":
                        select.select([backend], [], [], delay)
                    elif wait == "epoll":
                        with selectors.EpollSelector() as selector:
                            selector.register(backend, selectors.EVENT_READ)
                            selector.select(delay)
                    else:
                        backend.settimeout(delay)
                        try:
                            backend.recv(1)
                        except TimeoutError:
                            pass
            else:
                r, w = os.pipe()
                timer = threading.Timer(delay, os.write, (w, b"x"))
                timer.start()
                os.read(r, 1)
                timer.join()
                os.close(r)
                os.close(w)
            self.wfile.write(line)


class Lines(socketserver.StreamRequestHandler):
    """Echoes whole lines until EOF: a client that never finishes a line holds it."""

    def handle(self):
        while line := self.rfile.readline():
            self.wfile.write(line)


class Frames(socketserver.BaseRequestHandler):
    """Lines echoed whole, framed by hand over request.recv (no rfile): stops at end of file."""

    def handle(self):
        pending = b""
        while data := self.request.recv(4096):
            pending += data
            *lines, pending = pending.split(b"\\n")
            for line in lines:
                self.request.sendall(line + b"\\n")


SUSPECT_TYPES = {"Supervisor", "ControlServer", "ControlConnection", "SignalWakeup"}


def _suspect(value):
    if type(value).__name__ in SUSPECT_TYPES:
        return type(value).__name__
    if isinstance(value, dict) and callable(value.get("shutdown")) and "ping" in value:
        return "command table"
    return None


def _attributes(value):
    """An object's instance attributes (its __dict__ and __slots__), a bound method's self, and
    what a function's closure holds."""
    if isinstance(value, type) or type(value).__name__ == "module":
        return {}
    found = {}
    if hasattr(value, "__self__") and not isinstance(value.__self__, type):
        found["__self__"] = value.__self__
    for name, cell in zip(
        getattr(getattr(value, "__code__", None), "co_freevars", ()),
        getattr(value, "__closure__", None) or (),
    ):
        try:
            found[f"<closure {name}>"] = cell.cell_contents
        except ValueError:
            pass  # an empty cell
    found.update(getattr(value, "__dict__", {}) or {})
    for cls in type(value).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if isinstance(slot, str) and hasattr(value, slot):
                found[slot] = getattr(value, slot)
    return found


class Reach(socketserver.StreamRequestHandler):
    """Walks self.server's attributes (options.depth levels) looking for a way to the
    supervisor or the control commands; answers the paths it found, as JSON."""

    def handle(self):
        self.rfile.readline()
        depth = int(self.server.options.get("depth", 1))
        found = []
        frontier = [("server", self.server)]
        seen = {id(self.server)}
        for _ in range(depth):
            following = []
            for path, obj in frontier:
                for name, value in _attributes(obj).items():
                    where = f"{path}.{name}"
                    kind = _suspect(value)
                    if kind:
                        found.append(f"{where} ({kind})")
                    if id(value) not in seen:
                        seen.add(id(value))
                        following.append((where, value))
            frontier = following
        self.wfile.write(json.dumps(found).encode() + b"\\n")
'''


def write_handlers(directory: Path) -> str:
    """Write the handler module into `directory` (on the daemon's PYTHONPATH); its name."""
    (directory / f"{HANDLERS_MODULE}.py").write_text(HANDLERS)
    return HANDLERS_MODULE


@pytest.fixture
def handlers(tmp_path: Path) -> str:
    return write_handlers(tmp_path)


def server_section(name: str, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: keys}})


# -- daemons ---------------------------------------------------------------------------------


class LimitedDaemon(Daemon):
    """A Daemon (tests.conftest) whose process may start under a lower RLIMIT_NOFILE.

    The limit is set by Daemon's prelude, in a wrapper that then execs the daemon.
    """

    def __init__(
        self, directory: Path, config: str, path: str = "", nofile: int | None = None
    ) -> None:
        prelude = ""
        if nofile is not None:
            prelude = (
                f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))"
            )
        super().__init__(directory, config, path=path, prelude=prelude)


def _teardown(started: list[Daemon]) -> list[int]:
    """Kill what is left of `started`; the pids of processes that outlived their daemon."""
    leaked: list[int] = []
    for daemon in started:
        if daemon.proc.poll() is not None:
            deadline = time.monotonic() + 5
            while daemon.strays() and time.monotonic() < deadline:
                time.sleep(0.05)
            leaked += daemon.strays()
        daemon.close()
    return leaked


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., LimitedDaemon]]:
    """launch(config, nofile=None, ready=True) -> LimitedDaemon; start_daemon's twin that can
    lower the daemon's descriptor limit."""
    started: list[Daemon] = []

    def start(config: str, nofile: int | None = None, ready: bool = True) -> LimitedDaemon:
        sub = tmp_path / f"l{len(started)}"
        sub.mkdir()
        daemon = LimitedDaemon(sub, config, path=str(tmp_path), nofile=nofile)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield start
    leaked = _teardown(started)
    assert not leaked, f"processes outlived their daemon: {leaked}"


@pytest.fixture(scope="module")
def module_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """launch(config) -> Daemon shared by a module's tests (hypothesis reuses one daemon across
    examples); `config` may use {dir} for the daemon's own directory. Killed at module end."""
    started: list[Daemon] = []
    base = tmp_path_factory.mktemp("module")

    def start(config: str) -> Daemon:
        sub = base / f"m{len(started)}"
        sub.mkdir()
        write_handlers(base)
        daemon = Daemon(sub, config.replace("{dir}", str(sub)), path=str(base))
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    leaked = _teardown(started)
    assert not leaked, f"processes outlived their daemon: {leaked}"


def stop_and_reap(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a daemon that is not our child (an upgrade's successor) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(gone, timeout, interval=0.05)
    finally:
        if not gone():
            os.kill(pid, signal.SIGKILL)


# -- clients and measurements ----------------------------------------------------------------


def ask(port: int, line: bytes, host: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send one line, read one line back (b"" when the server closed without answering)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(line)
        return s.makefile("rb").readline()


def round_trips(port: int, count: int, payload: bytes = b"ping\n") -> list[float]:
    """Seconds taken by each of `count` sequential echo round trips, each on a new connection
    (connect, send, read the echo, close): the accept path is what a busy loop would delay."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
        times.append(time.perf_counter() - started)
        assert got == payload, got
    return times


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def raise_nofile(wanted: int) -> None:
    """Raise this process's soft descriptor limit to at least `wanted` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def status(daemon: Daemon, server: str | None = None) -> dict[str, Any]:
    args = {} if server is None else {"server": server}
    reply = daemon.control("status", **args)
    assert reply["ok"], reply
    return reply["result"]


def short_tempdir(prefix: str) -> Path:
    """A short directory under /tmp: a Unix socket path holds at most 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
