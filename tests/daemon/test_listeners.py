"""What a stopping TCP listener sees, on real loopback listeners: the filter that drops new
SYNs (daemon.listeners) and the count of handshakes it has half done (daemon.handshakes).

A stopping server drains its accept queue behind a filter that drops new SYNs. A client whose
handshake is half done when the filter goes on must still get in: to hold one half done, a
test filter first drops the client's bare ACK that would complete it (HOLD_HANDSHAKES).
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator

import pytest

from daemon.handshakes import half_done
from daemon.listeners import attach_drop_syn_filter, attach_socket_filter
from tests.conftest import HOLD_HANDSHAKES, wait_for

TCP_SYN_SENT = 2

FAMILIES = [
    pytest.param((socket.AF_INET, "127.0.0.1"), id="ipv4"),
    pytest.param(
        (socket.AF_INET6, "::1"),
        id="ipv6",
        marks=pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6"),
    ),
]


@pytest.fixture(params=FAMILIES)
def listener(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def start_connect(listener: socket.socket) -> socket.socket:
    client = socket.socket(listener.family, socket.SOCK_STREAM)
    client.setblocking(False)
    assert client.connect_ex(listener.getsockname()[:2]) in (0, errno.EINPROGRESS)
    return client


def nothing_to_accept(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_a_handshake_half_done_when_the_filter_goes_on_completes_and_is_served(listener) -> None:
    attach_socket_filter(listener, HOLD_HANDSHAKES)
    client = start_connect(listener)
    try:
        # Connected on the client's side (it had the SYN-ACK); the listener dropped the ACK.
        assert select.select([], [client], [], 5)[1] == [client]
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert nothing_to_accept(listener)

        attach_drop_syn_filter(listener)
        client.send(b"request\n")  # its ACK comes with it, through the SYN filter
        assert select.select([listener], [], [], 5)[0] == [listener]
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(64) == b"request\n"
            conn.sendall(b"reply\n")
        listener.close()
        client.settimeout(5)
        assert client.recv(64) == b"reply\n"
    finally:
        client.close()


def test_a_new_client_gets_no_answer_then_is_refused_on_close(listener) -> None:
    address = listener.getsockname()[:2]
    attach_drop_syn_filter(listener)
    client = start_connect(listener)
    try:
        # Loopback answers a SYN within microseconds; a fifth of a second of nothing is none.
        assert select.select([], [client], [], 0.2)[1] == []
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_SYN_SENT
        assert nothing_to_accept(listener)
    finally:
        client.close()
    listener.close()
    with socket.socket(listener.family, socket.SOCK_STREAM) as late:
        late.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            late.connect(address)


def test_half_done_counts_each_listeners_own_handshakes(listener) -> None:
    family, host = listener.family, listener.getsockname()[0]
    other = socket.socket(family, socket.SOCK_STREAM)
    other.bind((host, 0))
    other.listen(8)
    clients = []
    try:
        assert half_done([listener, other]) == [0, 0]
        for sock in (listener, other):
            attach_socket_filter(sock, HOLD_HANDSHAKES)
        clients = [start_connect(listener) for _ in range(3)] + [start_connect(other)]
        assert select.select([], clients, [], 5)[1] and len(clients) == 4
        wait_for(lambda: half_done([listener, other]) == [3, 1])
        # Their requests complete the handshakes: nothing is left half done.
        for client in clients:
            select.select([], [client], [], 5)
            client.send(b"x")
        wait_for(lambda: half_done([listener, other]) == [0, 0])
    finally:
        for client in clients:
            client.close()
        other.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_a_wildcard_ipv6_listener_counts_its_ipv4_clients() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
        listener.listen(8)
        attach_socket_filter(listener, HOLD_HANDSHAKES)
        with socket.socket() as client:
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", listener.getsockname()[1]))
            assert select.select([], [client], [], 5)[1] == [client]
            wait_for(lambda: half_done([listener]) == [1])
