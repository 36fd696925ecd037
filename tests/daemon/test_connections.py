"""daemon.connections.Connection on real loopback TCP connections: what each way a read can end
looks like to a handler."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from daemon import connections
from daemon.connections import Connection, RequestCut, quiet_seconds, set_io_timeout


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """(server side as a Connection, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        fd, _ = listener._accept()  # type: ignore[attr-defined]
        conn = Connection(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        yield conn, client
    finally:
        conn.close()
        client.close()


def test_data_then_the_peers_close_read_as_data_then_end_of_file(pair) -> None:
    conn, client = pair
    client.sendall(b"line\n")
    client.shutdown(socket.SHUT_WR)
    reader = conn.makefile("rb")
    assert reader.readline() == b"line\n"
    assert reader.readline() == b""
    reader.close()


def test_our_shutdown_while_the_peer_is_open_reads_as_request_cut(pair) -> None:
    conn, client = pair
    client.sendall(b"half a li")
    reader = conn.makefile("rb")
    conn.shutdown(socket.SHUT_RD)  # what the watchdog does
    with pytest.raises(RequestCut):
        reader.readline()
    reader.close()


def test_an_expired_wait_is_a_timeout_not_a_short_read(pair) -> None:
    conn, client = pair
    set_io_timeout(conn, 0.05)
    client.sendall(b"half a li")
    reader = conn.makefile("rb")
    with pytest.raises(TimeoutError):
        reader.readline()


def test_a_non_blocking_read_still_says_no_data_yet(pair) -> None:
    conn, _client = pair
    with pytest.raises(BlockingIOError):
        conn.recv_into(bytearray(10), 0, socket.MSG_DONTWAIT)


def test_an_empty_buffer_reads_nothing_without_a_verdict(pair) -> None:
    conn, _client = pair
    assert conn.recv_into(bytearray(0)) == 0


def test_quiet_seconds_counts_from_the_last_data_sent(pair) -> None:
    conn, client = pair
    quiet = quiet_seconds(conn)
    assert quiet is not None and quiet < 5
    conn.sendall(b"reply\n")
    assert client.recv(10) == b"reply\n"
    assert quiet_seconds(conn) < 1.0
    conn.close()
    assert quiet_seconds(conn) is None


def test_a_child_forked_while_a_connection_closes_can_close_its_own(pair) -> None:
    # A pool thread closing a Connection holds the module's descriptor lock; a fork worker
    # forked at that moment must not inherit it held (its first close would hang for ever).
    conn, _client = pair
    with connections._FD_LOCK:
        pid = os.fork()
        if pid == 0:  # the child: close our copy, within a deadline
            signal.alarm(5)
            conn.close()
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child hung on its first close"
