"""ThreadingMixIn and ForkingMixIn with real threads and real forked children.

ForkingMixIn must reap only its own children and never hold the loop in waitpid(); the test
process forks children of its own next to the server's to prove the first.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from servers_testing import Harness, children, line_request, recv_until_eof, wait_for

import servers


class ReportingHandler(servers.StreamRequestHandler):
    """Reads 'SECONDS\\n', sleeps that long, answers 'PID START END\\n'.

    START and END are CLOCK_MONOTONIC readings, which are system-wide: intervals measured in
    different children compare.
    """

    def handle(self) -> None:
        seconds = float(self.rfile.readline())
        start = time.monotonic()
        time.sleep(seconds)
        self.wfile.write(f"{os.getpid()} {start} {time.monotonic()}\n".encode())


def report(address: Any, seconds: float) -> tuple[int, float, float]:
    pid, start, end = line_request(address, f"{seconds}\n".encode(), timeout=10).split()
    return int(pid), float(start), float(end)


def fork_unrelated_child(exit_code: int, seconds: float) -> int:
    """A child of the test process that has nothing to do with any server."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(exit_code)
    return pid


def state_of(pid: int) -> str:
    return children().get(pid, "")


@pytest.fixture
def unrelated_children() -> Iterator[list[int]]:
    """Children the test forks itself; killed and reaped at teardown if the test did not."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


# --- ForkingMixIn -----------------------------------------------------------------------------


def test_forking_server_reaps_only_its_own_children(
    harness: Harness, unrelated_children: list[int]
) -> None:
    server = harness.make(servers.ForkingTCPServer, ("127.0.0.1", 0), ReportingHandler)
    harness.serve(server)
    unrelated = fork_unrelated_child(exit_code=7, seconds=0.1)
    unrelated_children.append(unrelated)

    served = {report(server.server_address, 0)[0] for _ in range(3)}
    assert os.getpid() not in served and len(served) == 3  # each in a child of its own
    wait_for(lambda: state_of(unrelated) == "Z", message="the unrelated child to exit")
    # The server handles (and reaps) more children while the unrelated zombie waits.
    served |= {report(server.server_address, 0)[0] for _ in range(3)}
    wait_for(lambda: not server.active_children, message=lambda: f"{server.active_children}")
    assert not set(children()) & served  # reaped: no zombies left of the server's children

    assert state_of(unrelated) == "Z"  # nobody but us may wait for it
    assert os.waitpid(unrelated, 0) == (unrelated, 7 << 8)
    unrelated_children.remove(unrelated)


def test_forking_server_serves_while_a_child_is_busy(harness: Harness) -> None:
    server = harness.make(servers.ForkingTCPServer, ("127.0.0.1", 0), ReportingHandler)
    harness.serve(server)
    slow_result: list[tuple[int, float, float]] = []
    slow = threading.Thread(target=lambda: slow_result.append(report(server.server_address, 1.0)))
    slow.start()
    try:
        wait_for(lambda: server.active_children, message="the slow child")
        started = time.monotonic()
        report(server.server_address, 0)
        assert time.monotonic() - started < 0.5  # not held up by the busy child
        assert slow.is_alive()
    finally:
        slow.join(10)
    assert slow_result
    wait_for(lambda: not server.active_children)


def test_forking_server_keeps_to_max_children(harness: Harness) -> None:
    class Limited(servers.ForkingTCPServer):
        max_children = 2

    server = harness.make(Limited, ("127.0.0.1", 0), ReportingHandler)
    server.request_queue_size = 16
    harness.serve(server)

    most = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], len(children()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list[tuple[int, float, float]] = []
    clients = [
        threading.Thread(target=lambda: results.append(report(server.server_address, 0.4)))
        for _ in range(3)
    ]
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.join(10)
    finally:
        sampling.set()
        sampler.join()
    assert len(results) == 3
    assert len({pid for pid, _, _ in results}) == 3
    # At no moment were three handlers running together...
    events = sorted([(start, 1) for _, start, _ in results] + [(end, -1) for _, _, end in results])
    running = peak = 0
    for _when, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2
    # ...nor three children alive (zombies included).
    assert most[0] <= 2
    wait_for(lambda: not server.active_children)


def test_no_zombies_after_server_close(harness: Harness) -> None:
    server = harness.make(servers.ForkingTCPServer, ("127.0.0.1", 0), ReportingHandler)
    serving = harness.serve(server)
    pids = {report(server.server_address, 0.05)[0] for _ in range(3)}
    server.shutdown()
    serving.thread.join(5)
    server.server_close()
    assert not pids & set(children())
    assert not [pid for pid, state in children().items() if state == "Z"]


def test_server_close_waits_for_running_children(harness: Harness) -> None:
    server = harness.make(servers.ForkingTCPServer, ("127.0.0.1", 0), ReportingHandler)
    with socket.create_connection(server.server_address, timeout=10) as client:
        client.sendall(b"0.3\n")
        server.handle_request()  # forks and returns at once
        assert server.active_children
        server.server_close()  # block_on_close: waits for the child
        assert not server.active_children
        assert not children()
        assert recv_until_eof(client).split()[0].isdigit()


def test_server_close_without_blocking_keeps_no_pidfd(harness: Harness) -> None:
    class NotBlocking(servers.ForkingTCPServer):
        block_on_close = False

    server = harness.make(NotBlocking, ("127.0.0.1", 0), ReportingHandler)
    before = set(os.listdir("/proc/self/fd"))
    with socket.create_connection(server.server_address, timeout=10) as client:
        client.sendall(b"0.3\n")
        server.handle_request()  # forks and returns at once
        (pid,) = server.active_children
        server.server_close()  # does not wait: the child still runs
        assert server.active_children == {pid}
        pidfds = [fd for fd in set(os.listdir("/proc/self/fd")) - before if is_pidfd(fd)]
        assert pidfds == [], "server_close() leaves no pidfd open"
        assert recv_until_eof(client).split()[0] == str(pid).encode()
    wait_for(lambda: children().get(pid) == "Z")
    server.collect_children()  # reaped later, by pid
    assert not server.active_children and pid not in children()


def is_pidfd(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    except OSError:
        return False


def test_forked_child_does_not_keep_the_listener_open(harness: Harness) -> None:
    server = harness.make(servers.ForkingTCPServer, ("127.0.0.1", 0), ReportingHandler)
    address = server.server_address
    serving = harness.serve(server)
    listener = f"socket:[{os.fstat(server.socket.fileno()).st_ino}]"

    def child_let_go() -> bool:
        # The child closes its copy right after the fork; wait until it has run that far.
        for pid in server.active_children or ():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == listener for fd in fds):
                    return False
            except FileNotFoundError:
                return False
        return bool(server.active_children)

    with socket.create_connection(address, timeout=10) as client:
        client.sendall(b"1.0\n")
        wait_for(child_let_go)
        server.shutdown()
        serving.thread.join(5)
        server.socket.close()  # the parent's copy goes; the busy child must not hold another
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
        assert recv_until_eof(client)
    server.server_close()


def test_forking_udp_server_answers_from_children(harness: Harness) -> None:
    server = harness.make(servers.ForkingUDPServer, ("127.0.0.1", 0), PidDatagramHandler)
    harness.serve(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"who", server.server_address)
        pid = int(client.recv(100))
    assert pid != os.getpid()
    wait_for(lambda: not server.active_children)


class PidDatagramHandler(servers.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(str(os.getpid()).encode())


# --- ThreadingMixIn ---------------------------------------------------------------------------


class GatedHandler(servers.BaseRequestHandler):
    """Holds the request until the test opens the server's gate."""

    def handle(self) -> None:
        server = self.server
        server.daemon_seen.append(threading.current_thread().daemon)
        server.started.set()
        server.gate.wait(10)
        server.finished.set()


def gated(server: Any) -> Any:
    server.started, server.gate, server.finished = (threading.Event() for _ in range(3))
    server.daemon_seen = []
    return server


def close_in_thread(server: Any) -> tuple[threading.Thread, list[bool]]:
    """server_close() in a thread; the list gets whether the handler had finished by then."""
    finished_by_then: list[bool] = []

    def close() -> None:
        server.server_close()
        finished_by_then.append(server.finished.is_set())

    closer = threading.Thread(target=close)
    closer.start()
    return closer, finished_by_then


def test_block_on_close_joins_request_threads(harness: Harness) -> None:
    server = gated(harness.make(servers.ThreadingTCPServer, ("127.0.0.1", 0), GatedHandler))
    serving = harness.serve(server)
    with socket.create_connection(server.server_address, timeout=5):
        assert server.started.wait(5)
        server.shutdown()
        serving.thread.join(5)
        closer, finished_by_then = close_in_thread(server)
        closer.join(0.2)
        assert closer.is_alive()  # still joining the request thread
        server.gate.set()
        closer.join(5)
    assert finished_by_then == [True]
    assert server.daemon_seen == [False]


def test_daemon_threads_are_daemons_and_not_joined(harness: Harness) -> None:
    class Daemonic(servers.ThreadingTCPServer):
        daemon_threads = True

    server = gated(harness.make(Daemonic, ("127.0.0.1", 0), GatedHandler))
    serving = harness.serve(server)
    try:
        with socket.create_connection(server.server_address, timeout=5):
            assert server.started.wait(5)
            server.shutdown()
            serving.thread.join(5)
            closer, finished_by_then = close_in_thread(server)
            closer.join(5)
            assert finished_by_then == [False]  # returned with the handler still running
            assert server.daemon_seen == [True]
    finally:
        server.gate.set()
    assert server.finished.wait(5)


def test_no_block_on_close_does_not_join(harness: Harness) -> None:
    class NotBlocking(servers.ThreadingTCPServer):
        block_on_close = False

    server = gated(harness.make(NotBlocking, ("127.0.0.1", 0), GatedHandler))
    try:
        with socket.create_connection(server.server_address, timeout=5):
            server.handle_request()
            assert server.started.wait(5)
            closer, finished_by_then = close_in_thread(server)
            closer.join(5)
            assert finished_by_then == [False]
            assert server.daemon_seen == [False]
    finally:
        server.gate.set()
    assert server.finished.wait(5)


def test_threading_server_handles_requests_concurrently(harness: Harness) -> None:
    server = gated(harness.make(servers.ThreadingTCPServer, ("127.0.0.1", 0), GatedHandler))
    harness.serve(server)
    with socket.create_connection(server.server_address, timeout=5):
        assert server.started.wait(5)
        # The first request is still being handled; a second one is served meanwhile.
        server.RequestHandlerClass = EchoLine
        assert line_request(server.server_address, b"meanwhile\n") == b"MEANWHILE\n"
        server.gate.set()


class EchoLine(servers.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())
