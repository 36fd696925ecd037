"""Promise 8: reloads and a zero-downtime upgrade lose no request on servers they leave alone.

Client threads connect, echo and close in a loop against unchanged servers (thread, fork and
inline) while five reloads add and remove servers around them and change another one (by
SIGHUP and by the `reload` command, alternately), and then while a SIGUSR2 upgrade hands every
socket to a new process. Not one request may fail.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for
from tests.reliability.conftest import status, stop_and_reap


class Load:
    """Threads that connect, echo one line and close, as fast as they can; every failure."""

    def __init__(self, ports: list[int], threads: int = 3) -> None:
        self.ports = ports
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            port = self.ports[(i + n) % len(self.ports)]
            n += 1
            payload = f"{i}:{n}\n".encode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    reply = s.makefile("rb").read()
                problem = None if reply == payload else f"port {port}: got {reply!r}"
            except OSError as exc:
                problem = f"port {port}: {exc!r}"
            with self._lock:
                if problem is None:
                    self.ok += 1
                else:
                    self.failures.append(problem)

    def more(self, count: int) -> None:
        """Wait until `count` more requests have succeeded."""
        target = self.ok + count
        wait_for(lambda: self.ok >= target, 20)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_reloads_and_upgrade_lose_no_request(start_daemon, tmp_path: Path) -> None:
    steady = {"thread": free_port(), "fork": free_port(), "inline": free_port()}
    moving = [free_port() for _ in range(6)]
    steady_servers: dict[str, Any] = {
        "steady-thread": {"listen": f"127.0.0.1:{steady['thread']}", "handler": "echo"},
        "steady-fork": {
            "listen": f"127.0.0.1:{steady['fork']}",
            "handler": "echo",
            "concurrency": "fork",
            "workers": 2,
        },
        "steady-inline": {
            "listen": f"127.0.0.1:{steady['inline']}",
            "handler": "echo",
            "concurrency": "inline",
        },
    }

    def config(round_: int) -> str:
        servers = dict(steady_servers)
        # Added this round (the previous round's one is removed), and one changed every round.
        servers[f"extra{round_}"] = {"listen": f"127.0.0.1:{moving[round_]}", "handler": "echo"}
        servers["changing"] = {
            "listen": f"127.0.0.1:{moving[5]}",
            "handler": "echo",
            "workers": round_ + 1,
        }
        return daemon_section(tmp_path, log_level="info") + tomli_w.dumps({"servers": servers})

    daemon = start_daemon(config(0))
    old_pid = daemon.pid
    pids_before = {
        name: sorted(w["pid"] for w in figures.get("worker_processes", []))
        for name, figures in status(daemon)["servers"].items()
    }
    new_pid = None
    try:
        with Load(list(steady.values())) as load:
            load.more(100)
            for round_ in range(1, 5 + 1):
                daemon.config_path.write_text(config(round_ % 5))
                if round_ % 2:
                    done = len(daemon.find("reload_done"))
                    daemon.send(signal.SIGHUP)
                    wait_for(lambda done=done: len(daemon.find("reload_done")) > done)
                else:
                    reply = daemon.control("reload")
                    assert reply["ok"], reply
                    assert set(reply["result"]["unchanged"]) >= set(steady_servers)
                figures = status(daemon)["servers"]
                assert f"extra{round_ % 5}" in figures
                assert f"extra{(round_ - 1) % 5}" not in figures
                assert figures["changing"]["workers"] == round_ % 5 + 1
                assert echo_roundtrip(moving[round_ % 5], b"new\n") == b"new\n"
                load.more(100)
            steady_fork = status(daemon, "steady-fork")["servers"]["steady-fork"]
            kept = sorted(w["pid"] for w in steady_fork["worker_processes"])
            assert kept == pids_before["steady-fork"], "unchanged: the same fork workers"

            daemon.send(signal.SIGUSR2)
            new_pid = daemon.wait_event("upgrade_ready", timeout=30)["new_pid"]
            assert daemon.proc.wait(30) == 0, "the old daemon drains and exits 0"
            load.more(300)
        assert load.failures == [], (len(load.failures), load.failures[:5])
        print(f"{load.ok} requests, 0 failed, across 5 reloads and an upgrade")
        after = status(daemon)
        assert after["daemon"]["pid"] == new_pid != old_pid
        assert set(steady_servers) <= set(after["servers"])
        assert all(f["state"] == "running" for f in after["servers"].values())
        # Every socket was handed over: the moving servers answer on theirs too.
        for port in (moving[0], moving[5]):  # extra0 (the last round's) and changing
            assert echo_roundtrip(port, b"handed over\n") == b"handed over\n"
    finally:
        if new_pid is not None and psutil.pid_exists(new_pid):
            stop_and_reap(new_pid)
