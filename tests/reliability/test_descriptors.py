"""Promise 3: running out of descriptors is logged, rate-limited, costs no CPU, and passes.

The daemon runs under RLIMIT_NOFILE = 64 and a thread server is flooded with connections that
stay open (workers busy, a long queue), until accept() fails with EMFILE. The daemon must say so
in a few log lines rather than one per failure, must not spin on the listener that stays
readable, and must serve again as soon as the flood's connections close.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import Daemon, daemon_section, echo_roundtrip, free_port, wait_for
from tests.reliability.conftest import cpu_seconds, server_section

NOFILE = 64
FLOOD = 100  # connections, well past what 64 descriptors can hold
CAPACITY = "out of capacity"


def flood_config(tmp_path: Path, flood_port: int, other_port: int) -> str:
    config = daemon_section(tmp_path, log_level="info")
    # Every flood connection is held by the daemon: 8 in handlers (30 s timeout), the rest queued.
    config += server_section(
        "flood",
        listen=f"127.0.0.1:{flood_port}",
        handler="echo",
        concurrency="thread",
        workers=8,
        max_queue=500,
        timeout=30,
    )
    config += server_section("other", listen=f"127.0.0.1:{other_port}", handler="echo")
    return config


def capacity_lines(daemon: Daemon, port: int | None = None) -> list[dict[str, object]]:
    return [
        e
        for e in daemon.events()
        if CAPACITY in str(e.get("event", "")) and (port is None or f", {port})" in e["event"])
    ]


@contextmanager
def exhausted(daemon: Daemon, port: int) -> Iterator[list[socket.socket]]:
    """Hold FLOOD connections to `port` until the daemon's accept() fails with EMFILE."""
    held: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(lambda: capacity_lines(daemon, port), 10)
        yield held
    finally:
        for s in held:
            s.close()


def cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    return cpu_seconds(pid) - before


def test_descriptor_exhaustion_is_logged_rate_limited_costs_no_cpu_and_passes(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    flood_port, other_port = free_port(), free_port()
    daemon = launch(flood_config(tmp_path, flood_port, other_port), nofile=NOFILE)
    with exhausted(daemon, flood_port):
        spent = cpu_over(daemon.pid, 2.0)
        print(f"daemon CPU over 2 s of exhaustion: {spent:.3f} s")
        assert spent < 0.5, f"the daemon spins while out of descriptors: {spent:.2f}s CPU in 2s"
        lines = capacity_lines(daemon, flood_port)
        assert len(lines) == 1, [e["event"] for e in lines]
        assert lines[0]["level"] == "warning" and lines[0]["logger"] == "servers"
        assert "EMFILE" in str(lines[0]["event"])
        closed_at = time.monotonic()
    # As soon as the flood lets go, both servers and the control socket serve again.
    wait_for(lambda: echo_roundtrip(flood_port, b"back\n") == b"back\n", 5, interval=0.05)
    recovered_after = time.monotonic() - closed_at
    print(f"serving again {recovered_after:.3f} s after the flood closed")
    assert recovered_after < 2.0
    assert echo_roundtrip(other_port, b"other\n") == b"other\n"
    assert daemon.control("ping")["result"] == "pong"
    assert len(capacity_lines(daemon)) <= 3, "at most one line per listener per interval"
    assert daemon.stop() == 0


def test_control_socket_answers_during_descriptor_exhaustion_without_spinning(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    flood_port, other_port = free_port(), free_port()
    daemon = launch(flood_config(tmp_path, flood_port, other_port), nofile=NOFILE)
    with (
        exhausted(daemon, flood_port),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control,
    ):
        control.settimeout(3)
        control.connect(daemon.control_socket)  # completes in the kernel's backlog
        control.sendall(b'{"command": "ping"}\n')
        spent = cpu_over(daemon.pid, 2.0)
        try:
            reply = json.loads(control.makefile("rb").readline() or b"null")
        except TimeoutError:
            reply = None
    print(f"daemon CPU over 2 s with a control client waiting: {spent:.3f} s; reply {reply}")
    assert daemon.stop() == 0
    assert spent < 0.5, f"the loop spins on the control socket: {spent:.2f}s CPU in 2s"
    assert reply == {"ok": True, "result": "pong"}, reply
