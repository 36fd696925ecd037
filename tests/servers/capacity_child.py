"""Run by test_base.py in a child process: a server that runs out of file descriptors.

The child lowers its own RLIMIT_NOFILE and fills the table, so that accept() fails with EMFILE
while a connection waits in the backlog; pytest's process is never touched. Prints one JSON object
with what it measured on its last line of stdout; the test asserts on it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

# Run as a script, this file's directory is sys.path[0]: servers_testing imports from there.
from servers_testing import LineEchoHandler, LogRecords, wait_for

import servers

FD_LIMIT = 128


class CountingServer(servers.TCPServer):
    """Counts closed requests, so the child knows when a served connection's fd is free again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closed_requests = 0
        super().__init__(*args, **kwargs)

    def close_request(self, request: Any) -> None:
        super().close_request(request)
        self.closed_requests += 1


def hog() -> list[int]:
    """Open descriptors until the table is full."""
    fds = []
    while True:
        try:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            return fds


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def readable(sock: socket.socket, timeout: float) -> bool:
    # select.select() needs no descriptor of its own, unlike a selector: it works with none free.
    return bool(select.select([sock], [], [], timeout)[0])


def connect(address: Any, line: bytes) -> socket.socket:
    client = socket.create_connection(address, timeout=10)
    client.sendall(line)
    return client


def direct_steps(records: LogRecords) -> dict[str, Any]:
    """handle_ready() from a caller's own loop while descriptors are exhausted."""
    with CountingServer(("127.0.0.1", 0), LineEchoHandler) as server:
        client = connect(server.server_address, b"direct\n")
        assert readable(server.socket, 5), "the connection never reached the backlog"
        hogs = hog()
        try:
            attempts = [server.handle_ready() for _ in range(200)]
            backoff = server.accept_backoff()
        finally:
            release(hogs)
        served = server.handle_ready()
        reply = client.recv(100)
        client.close()
        return {
            "attempts": len(attempts),
            "taken": sum(attempts),
            "backoff": backoff,
            "warnings": records.warnings(),
            "served_after_release": served,
            "reply": reply.decode(),
        }


def serve_forever_steps(records: LogRecords) -> dict[str, Any]:
    """serve_forever() with a connection pending and no descriptor free: it must not spin."""
    server = CountingServer(("127.0.0.1", 0), LineEchoHandler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        # A first request proves the loop is up (its wakeup socket is open); once the server has
        # closed that connection, the only descriptor accept() needs is the one we will take away.
        warm = connect(server.server_address, b"warm\n")
        assert warm.recv(100) == b"WARM\n"
        warm.close()
        wait_for(lambda: server.closed_requests == 1)
        pending = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hogs = hog()
        try:
            pending.connect(server.server_address)  # needs no new descriptor
            pending.sendall(b"pending\n")
            wait_for(records.warnings, message="a capacity warning")
            cpu_before = time.process_time()
            wall_before = time.monotonic()
            # Measuring, not synchronising: the loop must stay (nearly) idle for this long.
            time.sleep(1.0)
            cpu = time.process_time() - cpu_before
            wall = time.monotonic() - wall_before
            answered_while_exhausted = readable(pending, 0)
        finally:
            released_at = time.monotonic()
            release(hogs)
        pending.settimeout(10)
        reply = pending.recv(100)
        latency = time.monotonic() - released_at
        pending.close()
        return {
            "cpu": cpu,
            "wall": wall,
            "answered_while_exhausted": answered_while_exhausted,
            "reply": reply.decode(),
            "latency": latency,
            "warnings": records.warnings(),
        }
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def run(step: Callable[[LogRecords], dict[str, Any]]) -> dict[str, Any]:
    records = LogRecords()
    logger = logging.getLogger("servers")
    logger.addHandler(records)
    try:
        return step(records)
    finally:
        logger.removeHandler(records)


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))
    result = {"direct": run(direct_steps), "serve_forever": run(serve_forever_steps)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
