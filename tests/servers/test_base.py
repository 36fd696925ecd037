"""BaseServer: serve_forever() without polling, the handle_ready() step, handle_request(), errors,
capacity back-off and the context manager, on real loopback sockets.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import select
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers_testing import (
    REPO,
    DatagramUpperHandler,
    Harness,
    LineEchoHandler,
    ctxt_switches,
    line_request,
    recv_until_eof,
    run_python,
    wait_for,
)

import servers


def readable(sock: Any, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def stream_client(address: Any, line: bytes) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(address)
    client.sendall(line)
    return client


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


# --- no polling -------------------------------------------------------------------------------


def wait_until_settled(tids: list[int]) -> None:
    """Wait until the threads have stopped switching: every one of them is blocked for good."""
    last = [-1]

    def settled() -> bool:
        now = sum(ctxt_switches(tid) for tid in tids)
        same, last[0] = now == last[0], now
        return same

    wait_for(settled, timeout=10, interval=0.2, message="the serving threads to go idle")


def test_idle_servers_cost_no_wakeups_and_shut_down_at_once(harness: Harness) -> None:
    running = [
        harness.serve(harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler))
        for _ in range(100)
    ]
    for serving in running:  # each loop is up and has served a request
        assert line_request(serving.server.server_address) == b"PING\n"
    tids = [serving.native_id for serving in running]
    wait_until_settled(tids)

    before = sum(ctxt_switches(tid) for tid in tids)
    window = 2.0
    time.sleep(window)  # measuring idleness over a window, not waiting for an event
    wakeups = sum(ctxt_switches(tid) for tid in tids) - before
    # The stdlib polls every 0.5 s: 100 servers would wake 400 times in this window.
    assert wakeups < 5 * window, f"{wakeups} wake-ups in {window}s from 100 idle servers"

    slowest = 0.0
    for serving in running:
        started = time.monotonic()
        serving.server.shutdown()
        slowest = max(slowest, time.monotonic() - started)
        serving.thread.join(5)
        assert not serving.thread.is_alive()
    assert slowest < 0.2, f"shutdown() took {slowest:.3f}s"


def test_shutdown_before_serve_forever_returns_and_the_loop_then_exits(harness: Harness) -> None:
    server = harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler)
    server.shutdown()  # as in the stdlib: does not block when nothing is serving
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    # The request flag was consumed: the server can serve again afterwards.
    serving = harness.serve(server)
    assert line_request(serving.server.server_address) == b"PING\n"


def test_service_actions_runs_after_each_event(harness: Harness) -> None:
    class Counting(servers.TCPServer):
        actions = 0

        def service_actions(self) -> None:
            self.actions += 1

    server = harness.serve(harness.make(Counting, ("127.0.0.1", 0), LineEchoHandler)).server
    for _ in range(3):
        line_request(server.server_address)
    wait_for(lambda: server.actions >= 3)


# --- handle_ready() ---------------------------------------------------------------------------


def test_foreign_selectors_loop_serves_many_servers(
    harness: Harness, sockdir: Path, closing: list[socket.socket]
) -> None:
    tcp = harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler)
    udp = harness.make(servers.UDPServer, ("127.0.0.1", 0), DatagramUpperHandler)
    unix = harness.make(servers.UnixStreamServer, str(sockdir / "stream"), LineEchoHandler)
    unix_dgram = harness.make(
        servers.UnixDatagramServer, str(sockdir / "dgram"), DatagramUpperHandler
    )

    tcp_client = stream_client(tcp.server_address, b"tcp\n")
    unix_client = stream_client(unix.server_address, b"unix\n")
    udp_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_client.sendto(b"udp", udp.server_address)
    unix_dgram_client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unix_dgram_client.bind(str(sockdir / "client"))
    unix_dgram_client.sendto(b"unix dgram", unix_dgram.server_address)
    closing += [tcp_client, unix_client, udp_client, unix_dgram_client]

    served: list[Any] = []
    with selectors.DefaultSelector() as selector:
        for server in (tcp, udp, unix, unix_dgram):
            selector.register(server, selectors.EVENT_READ, server)
        deadline = time.monotonic() + 5
        while len(served) < 4 and time.monotonic() < deadline:
            for key, _events in selector.select(0.1):
                assert key.data.handle_ready() is True
                served.append(key.data)
    assert sorted(map(id, served)) == sorted(map(id, (tcp, udp, unix, unix_dgram)))

    assert recv_until_eof(tcp_client) == b"TCP\n"
    assert recv_until_eof(unix_client) == b"UNIX\n"
    udp_client.settimeout(5)
    assert udp_client.recvfrom(100) == (b"UDP", udp.server_address)
    unix_dgram_client.settimeout(5)
    assert unix_dgram_client.recv(100) == b"UNIX DGRAM"


def test_spurious_readiness_is_a_quiet_no_op(
    harness: Harness, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="servers")
    tcp = harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler)
    udp = harness.make(servers.UDPServer, ("127.0.0.1", 0), DatagramUpperHandler)
    unix = harness.make(servers.UnixStreamServer, str(sockdir / "s"), LineEchoHandler)
    for server in (tcp, udp, unix):
        assert server.handle_ready() is False  # nothing pending at all
        assert server.accept_backoff() == 0.0

    with stream_client(tcp.server_address, b"one\n") as client:
        assert readable(tcp, 5)
        assert tcp.handle_ready() is True
        assert tcp.handle_ready() is False  # the readiness was used up by the first call
        assert recv_until_eof(client) == b"ONE\n"
    assert tcp.accept_backoff() == 0.0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_two_servers_sharing_a_listener_the_loser_gets_false(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="servers")
    winner = harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler)
    loser = harness.make(
        servers.TCPServer, winner.server_address, LineEchoHandler, bind_and_activate=False
    )
    # The same listening socket (one open file description) in both, as after fork() or with
    # a socket passed around: both see readiness, only one accept() can win.
    loser.socket.close()
    loser.socket = socket.socket(fileno=os.dup(winner.fileno()))
    loser.socket.setblocking(False)

    with stream_client(winner.server_address, b"race\n") as client:
        assert readable(winner, 5) and readable(loser, 0)
        assert winner.handle_ready() is True
        assert loser.handle_ready() is False
        assert recv_until_eof(client) == b"RACE\n"
    assert loser.accept_backoff() == 0.0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_verify_request_refusal_counts_as_taken_and_closes(harness: Harness) -> None:
    class Refusing(servers.TCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

    server = harness.make(Refusing, ("127.0.0.1", 0), LineEchoHandler)
    with stream_client(server.server_address, b"no\n") as client:
        assert readable(server, 5)
        assert server.handle_ready() is True
        assert recv_until_eof(client) == b""


# --- handle_request() -------------------------------------------------------------------------


class RecordingHandler(servers.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        self.server.handled.append(line)
        self.wfile.write(line.upper())


class RecordingServer(servers.TCPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: list[bytes] = []
        self.timeouts: list[float] = []

    def handle_timeout(self) -> None:
        self.timeouts.append(time.monotonic())


def test_handle_request_times_out_after_self_timeout(harness: Harness) -> None:
    server = harness.make(RecordingServer, ("127.0.0.1", 0), RecordingHandler)
    server.timeout = 0.2
    started = time.monotonic()
    assert server.handle_request() is None
    elapsed = time.monotonic() - started
    assert len(server.timeouts) == 1
    assert 0.2 <= elapsed < 1.0, elapsed
    assert server.handled == []


def test_handle_request_honours_the_listener_timeout_too(harness: Harness) -> None:
    # The stdlib's handle_request() takes the shorter of self.timeout and the socket's timeout.
    server = harness.make(RecordingServer, ("127.0.0.1", 0), RecordingHandler)
    server.timeout = 30
    server.socket.settimeout(0.2)
    started = time.monotonic()
    server.handle_request()
    assert len(server.timeouts) == 1
    assert time.monotonic() - started < 1.0


def test_handle_request_handles_exactly_one_request(
    harness: Harness, closing: list[socket.socket]
) -> None:
    server = harness.make(RecordingServer, ("127.0.0.1", 0), RecordingHandler)
    server.timeout = 5
    first = stream_client(server.server_address, b"first\n")
    second = stream_client(server.server_address, b"second\n")
    closing += [first, second]
    server.handle_request()
    assert server.handled == [b"first\n"]
    assert recv_until_eof(first) == b"FIRST\n"
    assert not readable(second, 0)  # still waiting in the backlog
    server.handle_request()
    assert server.handled == [b"first\n", b"second\n"]
    assert recv_until_eof(second) == b"SECOND\n"
    assert server.timeouts == []


class ContestedServer(RecordingServer):
    """A competitor holding the same listening socket accepts first, once.

    The server's selector did see the listener readable, but by the time its own accept() runs
    the connection is gone: the kernel answers EAGAIN, exactly as when another process or thread
    wins the race. The hook only fixes who wins; the spurious readiness is real.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.competitor = socket.socket(fileno=os.dup(self.fileno()))
        self.stolen: list[socket.socket] = []
        self.raced = threading.Event()

    def get_request(self) -> tuple[Any, Any]:
        if not self.raced.is_set():
            conn, _addr = self.competitor.accept()
            self.stolen.append(conn)
            self.raced.set()
        return super().get_request()

    def server_close(self) -> None:
        super().server_close()
        self.competitor.close()
        for conn in self.stolen:
            conn.close()


def test_handle_request_keeps_waiting_across_a_spurious_readiness(
    harness: Harness, closing: list[socket.socket]
) -> None:
    server = harness.make(ContestedServer, ("127.0.0.1", 0), RecordingHandler)
    server.timeout = 10
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        closing.append(stream_client(server.server_address, b"stolen\n"))
        assert server.raced.wait(5)
        second = stream_client(server.server_address, b"second\n")
        closing.append(second)
        assert recv_until_eof(second) == b"SECOND\n"
    finally:
        thread.join(10)
    assert not thread.is_alive()
    assert server.handled == [b"second\n"]
    assert server.timeouts == []


# --- errors -----------------------------------------------------------------------------------


class FailingHandler(servers.StreamRequestHandler):
    """'fail' raises ValueError, 'exit' SystemExit, 'interrupt' KeyboardInterrupt; else echo."""

    def handle(self) -> None:
        line = self.rfile.readline().strip()
        if line == b"fail":
            raise ValueError("handler failed on purpose")
        if line == b"exit":
            raise SystemExit(3)
        if line == b"interrupt":
            raise KeyboardInterrupt
        self.wfile.write(line.upper() + b"\n")


def test_handler_error_is_logged_with_traceback_and_client_and_serving_goes_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="servers")
    server = harness.serve(harness.make(servers.TCPServer, ("127.0.0.1", 0), FailingHandler)).server
    with socket.create_connection(server.server_address, timeout=5) as client:
        client_address = client.getsockname()
        client.sendall(b"fail\n")
        assert recv_until_eof(client) == b""
    assert line_request(server.server_address, b"next\n") == b"NEXT\n"

    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    record = errors[0]
    assert record.name == "servers" and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert str(client_address) in record.getMessage()


def test_handle_error_can_be_overridden(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    class Quiet(servers.TCPServer):
        caught: list[tuple[Any, Any]] = []

        def handle_error(self, request: Any, client_address: Any) -> None:
            self.caught.append((sys.exc_info()[0], client_address))

    server = harness.make(Quiet, ("127.0.0.1", 0), FailingHandler)
    with stream_client(server.server_address, b"fail\n") as client:
        server.handle_request()
        assert recv_until_eof(client) == b""
        assert Quiet.caught == [(ValueError, client.getsockname())]
    assert caplog.records == []


@pytest.mark.parametrize(
    ("line", "exc"), [(b"exit\n", SystemExit), (b"interrupt\n", KeyboardInterrupt)]
)
def test_system_exit_and_keyboard_interrupt_propagate_from_handle_request(
    harness: Harness, line: bytes, exc: type[BaseException]
) -> None:
    server = harness.make(servers.TCPServer, ("127.0.0.1", 0), FailingHandler)
    with stream_client(server.server_address, line) as client:
        with pytest.raises(exc):
            server.handle_request()
        assert recv_until_eof(client) == b""  # the request was still closed


# --- capacity ---------------------------------------------------------------------------------


def test_out_of_descriptors_backs_off_without_spinning_and_recovers() -> None:
    proc = run_python([str(REPO / "tests" / "servers" / "capacity_child.py")], timeout=60)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.splitlines()[-1])

    direct = result["direct"]
    assert direct["attempts"] == 200 and direct["taken"] == 0  # every EMFILE is "nothing taken"
    assert direct["backoff"] > 0
    assert 1 <= len(direct["warnings"]) <= 2, direct["warnings"]  # rate-limited
    assert "EMFILE" in direct["warnings"][0]
    assert direct["served_after_release"] is True
    assert direct["reply"] == "DIRECT\n"

    looping = result["serve_forever"]
    assert looping["cpu"] < 0.3 * looping["wall"], looping  # not spinning on the readable listener
    assert looping["answered_while_exhausted"] is False
    assert looping["reply"] == "PENDING\n"  # served once descriptors came back
    assert looping["latency"] < 2.0
    assert 1 <= len(looping["warnings"]) <= 2, looping["warnings"]


# --- context manager --------------------------------------------------------------------------


def test_context_manager_closes_the_socket() -> None:
    with servers.TCPServer(("127.0.0.1", 0), LineEchoHandler) as server:
        assert server.fileno() >= 0
        address = server.server_address
    assert server.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_context_manager_removes_the_unix_socket_file(sockdir: Path) -> None:
    path = sockdir / "cm.sock"
    with servers.UnixStreamServer(str(path), LineEchoHandler) as server:
        assert path.is_socket()
    assert server.socket.fileno() == -1
    assert not path.exists()


HOOKS = (
    "__init__",
    "fileno",
    "handle_request",
    "serve_forever",
    "shutdown",
    "server_close",
    "verify_request",
    "process_request",
    "finish_request",
    "handle_error",
    "handle_timeout",
    "service_actions",
    "get_request",
    "shutdown_request",
    "close_request",
    "server_bind",
    "server_activate",
)


@pytest.mark.parametrize("name", [n for n in socketserver.__all__ if n.endswith("Server")])
def test_every_server_class_takes_the_stdlibs_arguments(name: str) -> None:
    # Code written for socketserver calls these by keyword too (bind_and_activate=False).
    ours, theirs = getattr(servers, name), getattr(socketserver, name)
    for hook in HOOKS:
        if hasattr(theirs, hook):
            expected = [
                (p.name, p.kind, p.default)
                for p in inspect.signature(getattr(theirs, hook)).parameters.values()
            ]
            got = [
                (p.name, p.kind, p.default)
                for p in inspect.signature(getattr(ours, hook)).parameters.values()
            ]
            assert got == expected, f"{name}.{hook}"
