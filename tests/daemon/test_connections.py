"""daemon.connections on real loopback TCP connections: what each way a read can end looks like
to a handler, and what the watchdog reads of a connection and of the thread serving it."""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from daemon import connections
from daemon.connections import (
    BUSY,
    READING,
    UNKNOWN,
    Connection,
    IOTimeoutSocket,
    RequestCut,
    Task,
    quiet_seconds,
    set_io_timeout,
    unsent_bytes,
    write_was_cut,
)
from tests.conftest import wait_for


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


def test_unsent_bytes_are_what_a_client_that_does_not_read_leaves_queued(pair) -> None:
    conn, client = pair
    assert unsent_bytes(conn) == 0
    conn.sendall(b"read at once\n")
    assert client.recv(100) == b"read at once\n"
    assert wait_for(lambda: unsent_bytes(conn) == 0)
    conn.setblocking(False)
    queued = 0
    try:
        while True:
            queued += conn.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert 0 < unsent_bytes(conn) <= queued


def test_a_send_after_our_shutdown_is_a_cut_not_a_gone_client(pair) -> None:
    conn, _client = pair
    conn.shutdown(socket.SHUT_RDWR)  # what the watchdog does to a client that stopped reading
    with pytest.raises(BrokenPipeError):
        conn.sendall(b"reply\n")
    assert write_was_cut(conn)
    assert not write_was_cut((b"datagram", conn))


def test_a_send_to_a_client_that_reset_is_not_a_cut(pair) -> None:
    conn, client = pair
    client.sendall(b"unread\n")
    assert wait_for(lambda: select.select([conn], [], [], 0)[0])
    client.close()  # with data unread on our side: the kernel resets
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):
            conn.sendall(b"reply\n")
            time.sleep(0.01)
    assert not write_was_cut(conn)


def _in_syscall(task: Task) -> bool:
    with open(f"/proc/{task.pid}/task/{task.tid}/syscall", "rb") as f:
        return f.read().split()[0].isdigit()


def _blocked(block: Callable[[], object]) -> tuple[Task, threading.Thread]:
    """Run `block` in a thread; that thread's Task once it is blocked in a syscall."""
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        block()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: tids)
    task = Task(os.getpid(), tids[0])
    wait_for(lambda: _in_syscall(task))
    return task, thread


@pytest.fixture
def backend() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socket pair: the first end is a backend that has not answered yet."""
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.mark.parametrize(
    ("how", "verdict"),
    [
        ("recv", READING),
        ("rfile", READING),
        ("poll", READING),
        ("select", READING),
        ("epoll", READING),
        ("recv backend", BUSY),
        ("poll backend", BUSY),
        ("select backend", BUSY),
        ("epoll backend", BUSY),
        ("futex", BUSY),
    ],
)
def test_a_handler_waits_for_its_client_only_when_blocked_reading_it(
    pair, backend: tuple[socket.socket, socket.socket], how: str, verdict: str
) -> None:
    conn, client = pair
    inode = os.fstat(conn.fileno()).st_ino
    done = threading.Event()
    target = backend[0] if how.endswith("backend") else conn

    def poll() -> None:
        poller = select.poll()
        poller.register(target, select.POLLIN)
        poller.poll(10_000)

    def rfile() -> None:
        with conn.makefile("rb") as reader:
            reader.readline()

    def epoll() -> None:
        with selectors.EpollSelector() as selector:
            selector.register(target, selectors.EVENT_READ)
            selector.select(10)

    block = {
        "recv": lambda: conn.recv(10),
        "rfile": rfile,
        "poll": poll,
        "select": lambda: select.select([target], [], [], 10),
        "epoll": epoll,
        "recv backend": lambda: backend[0].recv(10),
        "poll backend": poll,
        "select backend": lambda: select.select([target], [], [], 10),
        "epoll backend": epoll,
        "futex": lambda: done.wait(10),  # waiting on a lock: a read of nothing
    }[how]
    task, thread = _blocked(block)
    try:
        assert task.waits_for(inode) == verdict
    finally:
        done.set()
        client.sendall(b"wake up\n")
        backend[1].sendall(b"answer")
        thread.join(5)
    assert not thread.is_alive()


def test_the_thread_of_a_fork_worker_is_seen_across_processes(pair) -> None:
    conn, client = pair
    inode = os.fstat(conn.fileno()).st_ino
    pid = os.fork()
    if pid == 0:  # a fork worker serving its copy of the connection
        signal.alarm(10)
        conn.recv(10)
        os._exit(0)
    try:
        task = Task(pid, pid)
        wait_for(lambda: _in_syscall(task))
        assert task.waits_for(inode) == READING
        assert task.waits_for(inode + 1) == BUSY  # blocked reading another socket
    finally:
        client.sendall(b"done\n")
        os.waitpid(pid, 0)
    assert Task(pid, pid).waits_for(inode) == UNKNOWN  # gone: /proc cannot say


def test_a_sendall_to_a_client_that_reads_a_trickle_gives_up_within_timeout() -> None:
    # An inline server's reply to a client that drains 2 KB every 50 ms: each wait for room
    # ends with progress, so SO_SNDTIMEO alone would let the sendall (and with it the daemon's
    # loop) go on for as long as the reply takes to trickle out, here about 4 s.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        fd, _ = listener._accept()  # type: ignore[attr-defined]
    conn = IOTimeoutSocket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.start_clock(0.5)
    set_io_timeout(conn, 0.5)
    done = threading.Event()

    def trickle() -> None:
        while not done.wait(0.05):
            client.recv(2048)

    reader = threading.Thread(target=trickle)
    reader.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            conn.sendall(b"x" * 160_000)
        elapsed = time.monotonic() - started
        assert elapsed < 1.5, f"the sendall gave up after {elapsed:.1f}s, not about 0.5s"
        # The connection's own per-wait bound is back for whatever comes next.
        timeval = conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        assert struct.unpack("ll", timeval) == (0, 500_000)
    finally:
        done.set()
        reader.join(5)
        conn.close()
        client.close()
