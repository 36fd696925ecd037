"""Promise 7: a graceful stop loses nothing it accepted, and accepts nothing it will drop.

Thirty clients send one request each to a handler that takes 250 ms; SIGTERM arrives while some
run, some wait in the pool's queue and some (the server was paused first) still sit in the
kernel's accept queue. Every one of them gets its full reply. Clients that arrive after the stop
began are refused (ECONNREFUSED), never accepted and then dropped. The daemon exits 0.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.listeners import BPF_RET_K, attach_socket_filter
from daemon.units import HANDSHAKE_GRACE
from tests.conftest import (
    HOLD_HANDSHAKES,
    Daemon,
    daemon_section,
    echo_roundtrip,
    free_port,
    socket_activation,
    wait_for,
)
from tests.reliability.conftest import server_section, status

IN_POOL = 20  # accepted by the running server: in a handler or in the pool's queue
IN_BACKLOG = 10  # connected while the server is paused: in the kernel's accept queue


class Client:
    """Connect and send one line at once; read the reply when told to."""

    def __init__(self, port: int, i: int) -> None:
        self.line = f"request {i}\n".encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(self.line)
        self.reply: bytes | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.reply = self.sock.makefile("rb").readline()
        except OSError as exc:
            self.reply = repr(exc).encode()
        finally:
            self.sock.close()


class LateClients:
    """Keep connecting while the daemon stops; classify every attempt."""

    def __init__(self, port: int, done: threading.Event) -> None:
        self.port = port
        self.done = done
        self.outcomes: dict[str, int] = {}
        self.dropped: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _record(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _run(self) -> None:
        last = False
        while not last:
            last = self.done.is_set()  # one more attempt after the daemon has gone
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except ConnectionRefusedError:
                self._record("refused")
                time.sleep(0.01)  # pacing, not synchronisation
                continue
            except TimeoutError:
                self._record("connect timed out")
                continue
            with s:
                try:
                    s.sendall(b"late\n")
                    reply = s.makefile("rb").readline()
                except OSError as exc:
                    reply = repr(exc).encode()
            if reply == b"late\n":
                self._record("served")
            else:
                self._record("dropped")
                self.dropped.append(reply.decode(errors="replace"))


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_stop_serves_everything_accepted_and_refuses_the_rest(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    config = daemon_section(tmp_path, shutdown_timeout=20) + server_section(
        "slow",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:SlowEcho",
        concurrency=mode,
        workers=4,
        max_queue=64,
        options={"delay": 0.25},  # 20 requests on 4 workers: a queue for over a second
    )
    daemon = start_daemon(config)
    if mode == "fork":
        wait_for(lambda: len(daemon.find("worker_spawned", server="slow")) == 4)

    clients = [Client(port, i) for i in range(IN_POOL)]
    wait_for(lambda: status(daemon, "slow")["servers"]["slow"]["requests"] == IN_POOL)
    assert daemon.control("pause", server="slow")["ok"]
    clients += [Client(port, i) for i in range(IN_POOL, IN_POOL + IN_BACKLOG)]
    figures = status(daemon, "slow")["servers"]["slow"]
    assert figures["requests"] == IN_POOL, "the paused server took nothing from its backlog"
    assert figures["active"] > 0 and figures["queued"] > 0, "running and queued at the stop"

    gone = threading.Event()
    late = LateClients(port, gone)
    late.thread.start()
    daemon.send(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    gone.set()
    late.thread.join(30)
    for client in clients:
        client.thread.join(30)

    replies = {c.line: c.reply for c in clients}
    assert replies == {c.line: c.line for c in clients}, "every accepted request got its reply"
    print(f"late clients: {late.outcomes}")
    assert late.outcomes.get("dropped", 0) == 0, late.dropped[:5]
    assert late.outcomes.get("connect timed out", 0) == 0, late.outcomes
    assert late.outcomes.get("refused", 0) >= 1, late.outcomes
    done = daemon.wait_event("shutdown_complete")
    assert done["forced"] == 0
    assert done["drained"] >= IN_BACKLOG, done


# -- handshakes half done when a server stops ------------------------------------------------


def half_done_client(port: int) -> socket.socket:
    """A client connected on its side, whose handshake the listener has not completed."""
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port))
    assert select.select([], [client], [], 5)[1] == [client]
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    client.settimeout(10)
    return client


@pytest.fixture
def held_listener() -> Iterator[tuple[socket.socket, int]]:
    """A listener holding handshakes half done, and its port; the daemon gets it as systemd
    would pass it (listen = "systemd:web"), and the test closes its own copy once it has."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    attach_socket_filter(listener, HOLD_HANDSHAKES)
    try:
        yield listener, listener.getsockname()[1]
    finally:
        listener.close()


def stopped(daemon: Daemon) -> bool:
    return status(daemon, "web")["servers"]["web"]["state"] == "stopped"


@pytest.mark.parametrize("how", ["stop", "SIGTERM"])
@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_stop_serves_a_client_whose_handshake_was_half_done(
    start_daemon, tmp_path: Path, held_listener: tuple[socket.socket, int], mode: str, how: str
) -> None:
    listener, port = held_listener
    config = daemon_section(tmp_path) + server_section(
        "web", listen="systemd:web", handler="echo", concurrency=mode, workers=2
    )
    daemon = start_daemon(config, **socket_activation([("web", listener)]))
    listener.close()
    assert echo_roundtrip(port, b"whole\n") == b"whole\n"  # the request completes the handshake

    client = half_done_client(port)
    with client:
        if how == "stop":
            assert daemon.control("stop", server="web")["ok"]
        else:
            daemon.send(signal.SIGTERM)
            daemon.wait_event("shutdown_begun")
        # The stopped listener waits for it: the request it sends now ends its handshake, and
        # the server's last connection is served in full.
        client.sendall(b"half done\n")
        assert client.makefile("rb").readline() == b"half done\n"
    if how == "stop":
        wait_for(lambda: stopped(daemon))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert daemon.stop() == 0
    assert not daemon.find("handshakes_abandoned")
    assert daemon.wait_event("shutdown_complete")["forced"] == 0


def test_a_handshake_never_completed_holds_a_stop_for_the_grace_only(
    start_daemon, tmp_path: Path, held_listener: tuple[socket.socket, int]
) -> None:
    listener, port = held_listener
    config = daemon_section(tmp_path) + server_section(
        "web", listen="systemd:web", handler="echo", concurrency="thread", workers=2
    )
    daemon = start_daemon(config, **socket_activation([("web", listener)]))
    listener.close()
    with half_done_client(port) as client:
        # Deaf from now on: the listener's SYN-ACK retransmissions get no ACK either.
        attach_socket_filter(client, ((BPF_RET_K, 0, 0, 0),))
        asked = time.monotonic()
        assert daemon.control("stop", server="web")["ok"]
        assert not stopped(daemon)  # still waiting for that handshake
        wait_for(lambda: stopped(daemon), timeout=HANDSHAKE_GRACE + 5)
        waited = time.monotonic() - asked
    assert HANDSHAKE_GRACE - 0.1 <= waited < HANDSHAKE_GRACE + 1, waited
    assert daemon.wait_event("handshakes_abandoned", server="web")["count"] == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert daemon.stop() == 0
