"""A log sink that goes away costs the log lines, never the daemon.

The daemon's stdout and stderr are a pipe, as when it runs under a log shipper or `| tee`. Once it
serves, the reader closes its end: every log line from then on meets EPIPE. The daemon must go on
serving, log what it logs (a handler's failure, a reload, a fork worker's death and replacement)
without tripping over it, and stop cleanly with status 0.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import psutil
import pytest
import tomli_w

from daemon.log import DRAIN_TIMEOUT
from tests.conftest import (
    REPO,
    control_request,
    daemon_section,
    echo_roundtrip,
    free_port,
    running_with,
    wait_for,
)

FAILING = """
import socketserver


class Fail(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        raise ValueError("boom")
"""


def test_a_closed_log_pipe_costs_the_daemon_nothing(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING)
    echo, fork, fail = free_port(), free_port(), free_port()
    servers = {
        "echo": {"listen": f"127.0.0.1:{echo}", "handler": "echo"},
        "fork": {
            "listen": f"127.0.0.1:{fork}",
            "handler": "echo",
            "concurrency": "fork",
            "workers": 1,
        },
        "fail": {"listen": f"127.0.0.1:{fail}", "handler": "failing:Fail"},
    }
    config = write_config(tmp_path, servers)
    read_end, write_end = os.pipe()
    proc = start_writing_to(write_end, config, tmp_path)
    try:
        with os.fdopen(read_end, "rb") as logs:
            for line in logs:
                if b'"daemon_ready"' in line:
                    break
            else:
                raise AssertionError(f"selectd exited {proc.wait()} before it was ready")
        # The reader is gone: every log line from here on meets EPIPE.

        for _ in range(3):
            assert echo_roundtrip(echo) == b"hello\n"
            assert echo_roundtrip(fork) == b"hello\n"
            assert echo_roundtrip(fail) == b""  # request_failed is logged, to nowhere
        (worker,) = psutil.Process(proc.pid).children()
        worker.kill()  # worker_exited, worker_spawned: logged by the loop
        wait_for(lambda: replacement(proc.pid, worker.pid))
        assert echo_roundtrip(fork) == b"hello\n"
        # A reload, logged (to nowhere); its reply says it was done.
        assert control_request(f"{tmp_path}/control.sock", "reload")["ok"]
        assert echo_roundtrip(echo) == b"hello\n"
        assert proc.poll() is None, "selectd died with its log sink"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: not running_with(str(config)), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_config(tmp_path: Path, servers: dict[str, dict[str, object]]) -> Path:
    """The daemon's config in tmp_path: the test daemon section and these servers."""
    config = tmp_path / "selectd.toml"
    config.write_text(daemon_section(tmp_path) + tomli_w.dumps({"servers": servers}))
    return config


def start_writing_to(fd: int, config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Start the daemon on `config` with stdout and stderr on `fd` (which the test then closes:
    the daemon holds the only copy), handler modules from tmp_path."""
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)])),
            cwd=tmp_path,
        )
    finally:
        os.close(fd)


def replacement(pid: int, dead: int) -> bool:
    """Whether the daemon `pid` has a fork worker again, other than `dead`."""
    return any(child.pid != dead for child in psutil.Process(pid).children())


# A failure whose log line is ~20 KB (the message, twice: in the event and in its traceback).
FAILING_LOUDLY = """
import socketserver


class Fail(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        raise ValueError("x" * 10000)
"""


SINKS = ("pipe", "socket", "terminal")


def sink(kind: str, small: bool = True) -> tuple[int, int]:
    """(our end, the daemon's end) of a log sink of `kind`: a small one is full after a line or
    two; otherwise a pipe or socket keeps the kernel's default size."""
    if kind == "pipe":
        ours, theirs = os.pipe()
        if small:
            fcntl.fcntl(theirs, fcntl.F_SETPIPE_SZ, 4096)
    elif kind == "socket":  # as the journal's stream socket
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if small:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours, theirs = a.detach(), b.detach()
    else:
        ours, theirs = os.openpty()
        tty.setraw(theirs)  # no \r added to the lines
    return ours, theirs


def read_some(fd: int) -> bytes:
    """What the sink holds now (b"" at its end: a terminal says EIO when the last writer goes)."""
    try:
        return os.read(fd, 65536)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def read_in_background(fd: int) -> tuple[bytearray, threading.Thread]:
    """Read `fd` to its end in a thread: (what it has read so far, the thread)."""
    received = bytearray()

    def read_to_end() -> None:
        while chunk := read_some(fd):
            received.extend(chunk)

    reader = threading.Thread(target=read_to_end)
    reader.start()
    return received, reader


def stalled_sink_daemon(
    tmp_path: Path, kind: str
) -> tuple[subprocess.Popen[bytes], int, dict[str, int]]:
    """A daemon whose stdout and stderr are a small sink of `kind`, which the test holds but
    does not read.

    Servers: "echo" (thread pool), "inline" and "thread" (each request fails loudly; the first
    logs from the loop itself). Returns the process, our end of the sink (read up to
    daemon_ready) and the ports.
    """
    (tmp_path / "loud.py").write_text(FAILING_LOUDLY)
    ports = {name: free_port() for name in ("echo", "inline", "thread")}
    servers = {
        "echo": {"listen": f"127.0.0.1:{ports['echo']}", "handler": "echo"},
        "inline": {
            "listen": f"127.0.0.1:{ports['inline']}",
            "handler": "loud:Fail",
            "concurrency": "inline",
        },
        "thread": {"listen": f"127.0.0.1:{ports['thread']}", "handler": "loud:Fail"},
    }
    config = write_config(tmp_path, servers)
    ours, theirs = sink(kind)
    proc = start_writing_to(theirs, config, tmp_path)
    seen = b""
    deadline = time.monotonic() + 15
    while b'"daemon_ready"' not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
        if select.select([ours], [], [], 0.1)[0]:
            seen += read_some(ours)
    assert_stderr_blocking(proc.pid)
    # Whatever else is in the sink now is left there: from here on nobody reads.
    return proc, ours, ports


def assert_stderr_blocking(pid: int) -> None:
    """The daemon writes without waiting on a second open of the sink (or MSG_DONTWAIT on a
    socket): the O_NONBLOCK flag must not be on the description it shares with others."""
    flags = int(Path(f"/proc/{pid}/fdinfo/2").read_text().split()[3], 8)
    assert not flags & os.O_NONBLOCK, "the daemon made its shared stderr non-blocking"


def thread_names(pid: int) -> list[str]:
    """The names of the threads of `pid`, as top -H shows them."""
    return [p.read_text().strip() for p in Path(f"/proc/{pid}/task").glob("*/comm")]


def fail_requests(ports: dict[str, int], count: int) -> None:
    for i in range(count):
        port = ports["inline"] if i % 2 else ports["thread"]
        assert echo_roundtrip(port) == b""  # the handler raised: logged, to a sink that waits


@pytest.mark.parametrize("kind", SINKS)
def test_a_log_sink_that_stops_reading_costs_lines_not_the_loop(tmp_path: Path, kind: str) -> None:
    proc, ours, ports = stalled_sink_daemon(tmp_path, kind)
    try:
        # ~2.4 MB of request_failed lines against a 4 KB sink: the first fill it, the next
        # wait in the daemon (up to 1 MiB), the rest are dropped and counted.
        fail_requests(ports, 120)
        started = time.monotonic()
        assert echo_roundtrip(ports["echo"]) == b"hello\n"
        ping = control_request(f"{tmp_path}/control.sock", "ping", timeout=5)
        assert ping["result"] == "pong"
        assert time.monotonic() - started < 2.0, "the loop waited on its log"
        # What waits for the sink now: one thread, started by the first line it refused.
        assert thread_names(proc.pid).count("selectd-log") == 1
        assert_stderr_blocking(proc.pid)  # still, with the sink refusing lines

        # The reader comes back: what waited is written, then how much was dropped.
        received, reader = read_in_background(ours)
        wait_for(lambda: b'"log_lines_dropped"' in received)
        proc.send_signal(signal.SIGTERM)
        reader.join(30)  # to the end: the daemon (and all it forked) has exited
        assert proc.wait(30) == 0
        lines = [json.loads(line) for line in bytes(received).splitlines() if line.strip()]
        events = [line["event"] for line in lines]
        failed = events.count("request_failed")
        (dropped,) = [line for line in lines if line["event"] == "log_lines_dropped"]
        assert failed > 10 and dropped["lines"] > 10
        assert failed + dropped["lines"] == 120, (failed, dropped)
        assert events.index("log_lines_dropped") > max(
            i for i, e in enumerate(events) if e == "request_failed"
        ), "the count comes after the lines it was dropped behind"
        assert events[-1] == "shutdown_complete"
        assert not running_with(str(tmp_path / "selectd.toml"))
    finally:
        os.close(ours)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_sink_that_keeps_up_costs_no_thread(tmp_path: Path, kind: str) -> None:
    # Read as fast as the daemon writes, a pipe or socket of the default size takes every line
    # at once: the writer thread is for a sink that stalls, and never starts here, so the
    # daemon forks its workers from a process with no thread but the loop.
    (tmp_path / "failing.py").write_text(FAILING)
    fork, fail = free_port(), free_port()
    servers = {
        "fork": {
            "listen": f"127.0.0.1:{fork}",
            "handler": "echo",
            "concurrency": "fork",
            "workers": 2,
        },
        "fail": {"listen": f"127.0.0.1:{fail}", "handler": "failing:Fail", "concurrency": "inline"},
    }
    config = write_config(tmp_path, servers)
    ours, theirs = sink(kind, small=False)
    proc = start_writing_to(theirs, config, tmp_path)
    received, reader = read_in_background(ours)
    try:
        wait_for(lambda: b'"daemon_ready"' in received)
        for _ in range(20):
            assert echo_roundtrip(fork) == b"hello\n"
            assert echo_roundtrip(fail) == b""  # request_failed, with its traceback
        (worker, _) = psutil.Process(proc.pid).children()
        worker.kill()  # worker_exited and worker_spawned, and a fork after them
        wait_for(lambda: received.count(b'"worker_spawned"') == 3)
        wait_for(lambda: received.count(b'"request_failed"') == 20)
        names = thread_names(proc.pid)
        assert len(names) == 1, names  # the loop alone: no pool here, and no writer thread
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.join(30)
        assert b'"shutdown_complete"' in received
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(30)
        os.close(ours)


@pytest.mark.parametrize("kind", SINKS)
def test_a_graceful_stop_does_not_wait_for_ever_on_a_stalled_log_sink(
    tmp_path: Path, kind: str
) -> None:
    proc, ours, ports = stalled_sink_daemon(tmp_path, kind)
    try:
        fail_requests(ports, 10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The writer thread stays blocked on the full sink; the daemon gives it DRAIN_TIMEOUT.
        assert proc.wait(30) == 0
        assert time.monotonic() - started < DRAIN_TIMEOUT + 2
        wait_for(lambda: not running_with(str(tmp_path / "selectd.toml")), timeout=5)
    finally:
        os.close(ours)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
