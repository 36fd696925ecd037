"""Promise 2: hung and slow clients are cut off by `timeout` and cannot starve anyone else.

A client that connects and sends nothing, and a slowloris that trickles one byte every 0.2 s,
are closed by the daemon within about `timeout`. Hundreds of idle connections against a thread
server cost that server at most `workers + max_queue` requests' worth of room (the rest are
rejected at once), never delay another server, and once their timeout passes the server serves
again.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for
from tests.reliability.conftest import p99, raise_nofile, round_trips, server_section, status

TIMEOUT = 0.6
SLACK = 1.0  # how much later than `timeout` the daemon may close a stalled connection
TRICKLE = 0.2


def timed_server(name: str, port: int, mode: str, handler: str, **keys: object) -> str:
    """A [servers.NAME] table: `handler` in `mode` (two workers for a pool), with TIMEOUT."""
    extra: dict[str, object] = {"workers": 2} if mode != "inline" else {}
    return server_section(
        name,
        listen=f"127.0.0.1:{port}",
        handler=handler,
        concurrency=mode,
        timeout=TIMEOUT,
        **extra,
        **keys,
    )


def lines_server(
    name: str, port: int, handlers: str, mode: str, handler: str = "Lines", **keys: object
) -> str:
    """timed_server() for a class of the test's handlers module."""
    return timed_server(name, port, mode, f"{handlers}:{handler}", **keys)


def watch_until_closed(port: int, trickle: bool, limit: float) -> tuple[float | None, bytes]:
    """Connect, then send nothing (or one byte per TRICKLE seconds, never a newline) until the
    daemon closes the connection: seconds from connect to close (None if still open at
    `limit`), and everything the daemon sent meanwhile."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.monotonic()
        deadline = started + limit
        while (now := time.monotonic()) < deadline:
            readable, _, _ = select.select([s], [], [], min(TRICKLE, deadline - now))
            if readable:
                try:
                    data = s.recv(100)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return time.monotonic() - started, received
                received += data
                continue
            if trickle:
                try:
                    s.sendall(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - started, received
        return None, received


def seconds_until_closed(port: int, trickle: bool, limit: float) -> float | None:
    return watch_until_closed(port, trickle, limit)[0]


@pytest.mark.parametrize("mode", ["thread", "fork", "inline"])
@pytest.mark.parametrize("handler", ["Lines", "Frames"])
def test_silent_client_is_cut_off_by_timeout(
    start_daemon, tmp_path: Path, handlers: str, mode: str, handler: str
) -> None:
    # Frames calls request.recv() itself, so an expired wait reaches it as BlockingIOError
    # (EAGAIN): the daemon still logs it as the timeout it is.
    port = free_port()
    config = daemon_section(tmp_path) + lines_server("lines", port, handlers, mode, handler)
    daemon = start_daemon(config)
    closed_after = seconds_until_closed(port, trickle=False, limit=TIMEOUT + SLACK + 2)
    assert closed_after is not None, "a client that sends nothing is never cut off"
    assert TIMEOUT * 0.8 <= closed_after <= TIMEOUT + SLACK, closed_after
    event = daemon.wait_event("request_timeout", server="lines")
    assert event["timeout"] == TIMEOUT
    assert echo_roundtrip(port, b"still serving\n") == b"still serving\n"
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["thread", "fork", "inline"])
def test_slowloris_is_cut_off_by_timeout(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path) + lines_server("lines", port, handlers, mode))
    closed_after = seconds_until_closed(port, trickle=True, limit=TIMEOUT + SLACK)
    assert closed_after is not None, (
        f"a slowloris trickling a byte every {TRICKLE}s was still connected after "
        f"{TIMEOUT + SLACK}s with timeout = {TIMEOUT}"
    )
    # Cut off for `timeout`, not sooner: what it sent did not count as being answered.
    assert closed_after >= TIMEOUT * 0.8, closed_after
    assert daemon.wait_event("request_timeout", server="lines")["timeout"] == TIMEOUT
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["thread", "fork", "inline"])
@pytest.mark.parametrize("handler", ["Lines", "Frames"])
def test_slowloris_is_cut_off_without_its_half_line_being_answered(
    start_daemon, tmp_path: Path, handlers: str, mode: str, handler: str
) -> None:
    # Lines reads with rfile.readline(), Frames frames request.recv() by hand: neither may
    # take the trickled, never finished line for a whole one when the daemon cuts it off.
    port = free_port()
    config = daemon_section(tmp_path) + lines_server("lines", port, handlers, mode, handler)
    daemon = start_daemon(config)
    closed_after, received = watch_until_closed(port, trickle=True, limit=TIMEOUT + SLACK)
    assert closed_after is not None, f"{handler} ({mode}): a slowloris was never cut off"
    assert received == b"", f"{handler} ({mode}) answered half a line: {received!r}"
    daemon.wait_event("request_timeout", server="lines")
    assert echo_roundtrip(port, b"whole\n") == b"whole\n"
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["thread", "fork", "inline"])
@pytest.mark.parametrize("handler", ["Lines", "Frames"])
def test_a_client_answered_within_timeout_keeps_its_connection(
    start_daemon, tmp_path: Path, handlers: str, mode: str, handler: str
) -> None:
    # One connection, one line every TIMEOUT / 4 for three times TIMEOUT: each is answered
    # well within `timeout`, so the connection lives on however long it lasts in all.
    port = free_port()
    config = daemon_section(tmp_path) + lines_server("lines", port, handlers, mode, handler)
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        reader = s.makefile("rb")
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 3 * TIMEOUT:
            s.sendall(b"line %d\n" % n)
            assert reader.readline() == b"line %d\n" % n, f"cut off after {n} lines"
            n += 1
            time.sleep(TIMEOUT / 4)
        reader.close()
    assert n >= 8
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["thread", "fork"])
@pytest.mark.parametrize("wait", ["sleep", "poll", "select", "epoll", "read"])
def test_a_handler_slower_than_timeout_keeps_its_client(
    start_daemon, tmp_path: Path, handlers: str, mode: str, wait: str
) -> None:
    # Each line is answered twice `timeout` late, the handler sleeping, waiting on a backend
    # (with a socket timeout, select or epoll), or blocked reading a pipe: none of it is the
    # client's doing, so the client keeps its connection from one reply to the next, and
    # nothing is cut off.
    port = free_port()
    config = daemon_section(tmp_path) + lines_server(
        "slow", port, handlers, mode, "SlowLines", options={"delay": 2 * TIMEOUT, "wait": wait}
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as reader:
        for n in range(2):
            started = time.monotonic()
            s.sendall(b"worth the wait %d\n" % n)
            assert reader.readline() == b"worth the wait %d\n" % n, f"cut off at line {n}"
            assert time.monotonic() - started >= 2 * TIMEOUT
    assert daemon.find("request_timeout") == []
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_daemon_that_dropped_root_still_tells_a_slow_handler_from_a_slow_client(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    # Linux makes a process that gave up root undumpable, and with it the fork workers it
    # forks: the watchdog could then not read which syscall a worker is blocked in, and would
    # cut off every connection sent nothing for `timeout`, slow handler or not.
    slow_port, lines_port = free_port(), free_port()
    config = (
        daemon_section(tmp_path, user="nobody")
        + lines_server(
            "slow", slow_port, handlers, "fork", "SlowLines", options={"delay": 2 * TIMEOUT}
        )
        + lines_server("lines", lines_port, handlers, "fork")
    )
    daemon = start_daemon(config)
    daemon.wait_event("privileges_dropped", user="nobody")
    with (
        socket.create_connection(("127.0.0.1", slow_port), timeout=10) as s,
        s.makefile("rb") as reader,
    ):
        for n in range(2):
            s.sendall(b"line %d\n" % n)
            assert reader.readline() == b"line %d\n" % n, f"cut off at line {n}"
    closed_after = seconds_until_closed(lines_port, trickle=True, limit=TIMEOUT + SLACK)
    assert closed_after is not None, "a slowloris was never cut off"
    daemon.wait_event("request_timeout", server="lines")
    assert [e["server"] for e in daemon.find("request_timeout")] == ["lines"]
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["thread", "fork", "inline"])
def test_a_client_that_never_reads_is_cut_off_by_timeout(
    start_daemon, tmp_path: Path, mode: str
) -> None:
    # chargen sends until the client goes; this client never reads, so once the buffers fill
    # the handler's send waits. A pool's watchdog sees data waiting to go out and nothing sent
    # for `timeout`, and shuts the connection. Inline, where the wait holds the whole loop, the
    # connection's sendall gives up `timeout` after it first had to wait. Either way, however
    # the kernel's window probes let a few bytes through now and then (each would start
    # another SO_SNDTIMEO wait), the whole is over within about `timeout`.
    port = free_port()
    config = daemon_section(tmp_path) + timed_server("gen", port, mode, "chargen")
    daemon = start_daemon(config)
    limit = TIMEOUT + SLACK
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        started = time.monotonic()
        wait_for(lambda: status(daemon, "gen")["servers"]["gen"]["completed"] == 1, limit)
        elapsed = time.monotonic() - started
    assert elapsed >= TIMEOUT, f"cut off after {elapsed}s, before any wait reached `timeout`"
    if mode != "inline":
        event = daemon.wait_event("request_timeout", server="gen")
        assert event.get("reason") in (None, "client stopped reading"), event
    assert not daemon.find("request_failed")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(100), "chargen serves the next client"
    assert daemon.stop() == 0


def test_idle_connections_cost_only_their_server_queue_and_never_delay_others(
    start_daemon, tmp_path: Path
) -> None:
    held_count, workers, max_queue, timeout = 300, 8, 4, 1.5
    raise_nofile(held_count + 200)
    pool_port, other_port = free_port(), free_port()
    config = daemon_section(tmp_path, log_level="info")
    config += server_section(
        "pool",
        listen=f"127.0.0.1:{pool_port}",
        handler="echo",
        concurrency="thread",
        workers=workers,
        max_queue=max_queue,
        timeout=timeout,
    )
    config += server_section("other", listen=f"127.0.0.1:{other_port}", handler="echo")
    daemon = start_daemon(config)
    round_trips(other_port, 20)  # warm up: the other server's pool threads exist

    held: list[socket.socket] = []
    opened = threading.Event()

    def open_idle_connections() -> None:
        try:
            for _ in range(held_count):
                held.append(socket.create_connection(("127.0.0.1", pool_port), timeout=10))
        finally:
            opened.set()

    opener = threading.Thread(target=open_idle_connections)
    try:
        opener.start()
        times = round_trips(other_port, 100)  # while the connections arrive
        opened.wait(30)
        times += round_trips(other_port, 100)  # while they are held
        assert len(held) == held_count
        figures = status(daemon, "pool")["servers"]["pool"]
        # Starved beyond max_queue? No: exactly workers + max_queue were taken, the rest were
        # rejected at once (closed, counted).
        assert figures["rejected"] == held_count - workers - max_queue, figures
        assert figures["requests"] == workers + max_queue, figures
        assert echo_roundtrip(pool_port, b"squeezed out\n") == b"", "rejected while full"
        worst = p99(times)
        print(f"other server: p99 {worst * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
        assert worst < 0.1, f"round-trip p99 {worst * 1000:.1f} ms on the other server"
        # Once the held connections time out (two rounds: the running ones, then the queued
        # ones), the pool serves again.
        started = time.monotonic()
        wait_for(
            lambda: echo_roundtrip(pool_port, b"back\n") == b"back\n",
            timeout * 2 + 3,
            interval=0.1,
        )
        assert time.monotonic() - started <= timeout * 2 + 3
    finally:
        opener.join(30)
        for s in held:
            s.close()
    assert daemon.stop() == 0
