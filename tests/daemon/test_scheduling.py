"""scheduling_policy: the kernel policy a server's requests run under, checked from inside them.

Each handler here answers with the policy of the thread that runs it (sched_getscheduler(0) is
per thread on Linux), so what is checked is what a request actually ran under, not only what
the daemon meant to set.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import daemon_section, free_port, wait_for

HANDLERS = """
import os
import socketserver


class PolicyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline():
            self.wfile.write(f"{os.sched_getscheduler(0)} {os.getpid()}\\n".encode())
"""
# A command server's program says the policy it was started under.
PRINT_POLICY = [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"]
OTHER, BATCH, IDLE = os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE


@pytest.fixture
def handlers(tmp_path: Path) -> str:
    (tmp_path / "policyhandlers.py").write_text(HANDLERS)
    return "policyhandlers:PolicyHandler"


def server(name: str, port: int, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: {"listen": f"127.0.0.1:{port}", **keys}}})


def ask(port: int, line: bytes = b"?\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        return s.makefile("rb").readline()


def policy_of(port: int) -> tuple[int, int]:
    """(the policy the request ran under, the pid that ran it)."""
    policy, pid = ask(port).split()
    return int(policy), int(pid)


def workers_of(daemon, name: str) -> set[int]:
    spawned = {e["worker_pid"] for e in daemon.find("worker_spawned", server=name)}
    return spawned & {c.pid for c in daemon.children()}


def test_each_pool_runs_its_requests_under_its_policy_and_the_loop_keeps_its_own(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    ports = {name: free_port() for name in ("threads", "forks", "plain", "program", "inline")}
    config = daemon_section(tmp_path)
    config += server(
        "threads", ports["threads"], handler=handlers, workers=2, scheduling_policy="batch"
    )
    config += server(
        "forks",
        ports["forks"],
        handler=handlers,
        concurrency="fork",
        workers=2,
        scheduling_policy="idle",
    )
    config += server("plain", ports["plain"], handler=handlers, concurrency="fork", workers=1)
    config += server("program", ports["program"], command=PRINT_POLICY, scheduling_policy="batch")
    config += server("inline", ports["inline"], handler=handlers, concurrency="inline")
    daemon = start_daemon(config)

    for _ in range(4):
        assert policy_of(ports["threads"]) == (BATCH, daemon.pid)
        policy, pid = policy_of(ports["forks"])
        assert policy == IDLE and pid != daemon.pid
        assert policy_of(ports["plain"])[0] == OTHER, "unset: the daemon's own policy"
        assert int(ask(ports["program"])) == BATCH
        # An inline handler runs in the loop, which no server's policy touches.
        assert policy_of(ports["inline"]) == (OTHER, daemon.pid)
    # Every worker of the pool, not only those that served, from outside.
    forks = workers_of(daemon, "forks")
    assert len(forks) == 2
    assert {os.sched_getscheduler(pid) for pid in forks} == {IDLE}
    assert os.sched_getscheduler(daemon.pid) == OTHER
    # A worker that dies is replaced under the same policy.
    killed = min(forks)
    os.kill(killed, signal.SIGKILL)
    replaced = wait_for(lambda: (workers_of(daemon, "forks") - forks) or None)
    assert {os.sched_getscheduler(pid) for pid in replaced} == {IDLE}
    assert not daemon.find("scheduling_policy_failed")
    assert daemon.stop() == 0


def test_a_reload_that_changes_the_policy_puts_new_requests_under_the_new_one(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    threads, forks = free_port(), free_port()

    def config(policy: str | None) -> str:
        keys = {} if policy is None else {"scheduling_policy": policy}
        text = daemon_section(tmp_path)
        text += server("threads", threads, handler=handlers, workers=2, **keys)
        text += server("forks", forks, handler=handlers, concurrency="fork", workers=2, **keys)
        return text

    daemon = start_daemon(config("batch"))
    assert policy_of(threads)[0] == BATCH
    assert policy_of(forks)[0] == BATCH
    old_workers = workers_of(daemon, "forks")

    daemon.config_path.write_text(config(None))
    reply = daemon.control("reload")
    assert reply.get("ok"), reply
    assert sorted(reply["result"]["changed"]) == ["forks", "threads"]
    # The old workers retire; their replacements are forked from the loop, under its policy.
    wait_for(lambda: not (workers_of(daemon, "forks") & old_workers))
    for _ in range(4):
        assert policy_of(threads)[0] == OTHER
        policy, pid = policy_of(forks)
        assert policy == OTHER and pid not in old_workers

    daemon.config_path.write_text(config("idle"))
    assert daemon.control("reload").get("ok")
    wait_for(lambda: {os.sched_getscheduler(p) for p in workers_of(daemon, "forks")} == {IDLE})
    assert policy_of(threads)[0] == IDLE
    assert policy_of(forks)[0] == IDLE
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_policy_the_kernel_refuses_is_logged_once_per_server_and_requests_are_served(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    # A daemon started under SCHED_IDLE that then drops root (and may not raise its nice value:
    # RLIMIT_NICE 0) may not leave SCHED_IDLE: the kernel refuses "batch" for its workers,
    # threads and programs alike.
    threads, forks, program = free_port(), free_port(), free_port()
    config = daemon_section(tmp_path, user="nobody")
    config += server("threads", threads, handler=handlers, workers=2, scheduling_policy="batch")
    config += server(
        "forks", forks, handler=handlers, concurrency="fork", workers=2, scheduling_policy="batch"
    )
    config += server("program", program, command=["/bin/cat"], scheduling_policy="batch")
    prelude = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NICE, (0, 0))\n"
        f"os.sched_setscheduler(0, {IDLE}, os.sched_param(0))"
    )
    daemon = start_daemon(config, prelude=prelude)

    # Two connections at once: the thread pool starts both its threads.
    with socket.create_connection(("127.0.0.1", threads), timeout=10) as first:
        first.sendall(b"?\n")
        assert int(first.makefile("rb").readline().split()[0]) == IDLE
        for _ in range(4):
            assert policy_of(threads)[0] == IDLE, "served, under the policy it had"
    for _ in range(4):
        assert policy_of(forks)[0] == IDLE
        assert ask(program, b"still served\n") == b"still served\n"
    wait_for(lambda: len(daemon.find("scheduling_policy_failed")) >= 2)
    refused = {e["server"]: e for e in daemon.find("scheduling_policy_failed")}
    assert set(refused) == {"threads", "forks"}
    assert len(daemon.find("scheduling_policy_failed")) == 2, "once per pool, not per worker"
    for event in refused.values():
        assert (event["level"], event["policy"]) == ("warning", "batch")
        assert event["error"] == "Operation not permitted"
    line = daemon.wait_event("exec_stderr", server="program")["line"]
    assert line == "selectd: scheduling_policy batch: Operation not permitted"
    assert daemon.stop() == 0
