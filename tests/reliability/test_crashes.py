"""Promise 1: a crashing handler costs only its own request.

A handler that raises, one that raises SystemExit, one that calls os._exit in a fork worker, and
a fork worker killed with SIGKILL mid-request: each loses exactly that request. Requests running
at the same time complete, the pool is refilled, and the events and counters say what happened.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil

from tests.conftest import daemon_section, free_port, wait_for
from tests.reliability.conftest import ask, server_section, status

SLOW_DELAY = 1.5  # long enough for every crash below to happen while the slow requests run


class SlowClients:
    """`count` slow requests in flight at once; their replies and when each arrived."""

    def __init__(self, port: int, count: int) -> None:
        self.replies: dict[int, bytes] = {}
        self.finished: dict[int, float] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(port, i), daemon=True) for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def _run(self, port: int, i: int) -> None:
        try:
            self.replies[i] = ask(port, f"slow {i}\n".encode(), timeout=20)
        except OSError as exc:
            self.replies[i] = repr(exc).encode()
        self.finished[i] = time.monotonic()

    def join(self) -> None:
        for t in self._threads:
            t.join(30)


def test_fork_worker_crashes_and_kills_cost_only_their_request(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    workers = 8
    config = daemon_section(tmp_path) + server_section(
        "crashy",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Crashy",
        concurrency="fork",
        workers=workers,
        options={"delay": SLOW_DELAY},
    )
    daemon = start_daemon(config)
    wait_for(lambda: len(daemon.find("worker_spawned", server="crashy")) == workers)

    slow = SlowClients(port, 3)
    wait_for(lambda: status(daemon, "crashy")["servers"]["crashy"]["active"] == 3)
    assert ask(port, b"raise\n") == b""
    assert ask(port, b"exit\n") == b""
    assert ask(port, b"_exit\n") == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as hung:
        hung.sendall(b"hang\n")
        victim = int(hung.makefile("rb").readline())
        os.kill(victim, signal.SIGKILL)
        assert hung.recv(100) == b"", "the killed worker's connection is closed, not left hanging"
    crashes_done = time.monotonic()
    slow.join()

    assert slow.replies == {i: f"slow {i}\n".encode() for i in range(3)}
    assert all(t > crashes_done for t in slow.finished.values()), (
        "the slow requests were in flight through every crash"
    )
    killed = daemon.wait_event("worker_exited", worker_pid=victim)
    assert killed["signal"] == "SIGKILL" and killed["level"] == "warning"
    assert daemon.wait_event("worker_exited", server="crashy", exit_code=7)["level"] == "warning"
    failed = daemon.find("request_failed", server="crashy")
    assert [e["exc_type"] for e in failed] == ["ValueError", "SystemExit"]

    # The pool refills: two replacements, and `workers` live workers again.
    wait_for(lambda: len(daemon.find("worker_spawned", server="crashy")) == workers + 2)

    def refilled() -> dict[str, object] | None:
        figures = status(daemon, "crashy")["servers"]["crashy"]
        live = [w for w in figures["worker_processes"] if psutil.pid_exists(w["pid"])]
        return figures if len(live) == workers else None

    figures = wait_for(refilled)
    assert victim not in {w["pid"] for w in figures["worker_processes"]}
    assert figures["errors"] == 4, figures  # raise, SystemExit, os._exit, SIGKILL
    assert figures["state"] == "running"
    assert ask(port, b"after\n") == b"after\n"
    assert daemon.stop() == 0


def test_thread_handler_exceptions_cost_only_their_request(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    workers = 4
    config = daemon_section(tmp_path) + server_section(
        "crashy",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Crashy",
        concurrency="thread",
        workers=workers,
        options={"delay": SLOW_DELAY},
    )
    daemon = start_daemon(config)
    baseline_threads = psutil.Process(daemon.pid).num_threads()

    slow = SlowClients(port, 2)
    wait_for(lambda: status(daemon, "crashy")["servers"]["crashy"]["active"] == 2)
    for _ in range(3):
        assert ask(port, b"raise\n") == b""
        assert ask(port, b"exit\n") == b""
    crashes_done = time.monotonic()
    slow.join()

    assert slow.replies == {i: f"slow {i}\n".encode() for i in range(2)}
    assert all(t > crashes_done for t in slow.finished.values())
    wait_for(lambda: len(daemon.find("request_failed", server="crashy")) == 6)
    types = [e["exc_type"] for e in daemon.find("request_failed", server="crashy")]
    assert sorted(types) == ["SystemExit"] * 3 + ["ValueError"] * 3
    figures = status(daemon, "crashy")["servers"]["crashy"]
    assert figures["errors"] == 6 and figures["requests"] == 8, figures
    # SystemExit ended no pool thread for good: the pool never grew past `workers` threads and
    # still serves `workers` requests at once.
    assert psutil.Process(daemon.pid).num_threads() <= baseline_threads + workers
    again = SlowClients(port, workers)
    wait_for(lambda: status(daemon, "crashy")["servers"]["crashy"]["active"] == workers)
    again.join()
    assert again.replies == {i: f"slow {i}\n".encode() for i in range(workers)}
    assert daemon.stop() == 0


def test_worker_exited_says_its_request_was_lost(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server_section(
        "crashy",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Crashy",
        concurrency="fork",
        workers=2,
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as hung:
        hung.sendall(b"hang\n")
        victim = int(hung.makefile("rb").readline())
        os.kill(victim, signal.SIGKILL)
        assert hung.recv(100) == b""
    killed = daemon.wait_event("worker_exited", worker_pid=victim)
    assert ask(port, b"_exit\n") == b""
    exited = daemon.wait_event("worker_exited", server="crashy", exit_code=7)
    assert daemon.stop() == 0
    assert killed.get("lost_request") is True, killed
    assert exited.get("lost_request") is True, exited
