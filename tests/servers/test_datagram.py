"""Datagram transports: oversized datagrams are dropped whole, never handed over truncated."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers_testing import Harness

import servers


class Recording(servers.BaseRequestHandler):
    """Records each datagram on the server and answers with its length."""

    def handle(self) -> None:
        data, sock = self.request
        self.server.received.append(data)
        sock.sendto(str(len(data)).encode(), self.client_address)


class RecordingUDPServer(servers.UDPServer):
    max_packet_size = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[bytes] = []


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))  # so that getsockname() is what the server sees
        sock.settimeout(5)
        yield sock


def deliver(server: Any, client: socket.socket, payload: bytes) -> bool:
    """Send one datagram and have the server take it; handle_ready()'s answer."""
    client.sendto(payload, server.server_address)
    assert select.select([server], [], [], 5)[0], "the datagram never arrived"
    return server.handle_ready()


def test_oversized_datagram_is_dropped_counted_and_logged(
    harness: Harness, client: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="servers")
    server = harness.make(RecordingUDPServer, ("127.0.0.1", 0), Recording)
    assert deliver(server, client, b"x" * 1025) is True  # taken (and dropped), not spurious
    assert server.received == []
    assert server.oversized_datagrams == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING and warnings[0].name == "servers"
    assert "max_packet_size=1024" in warnings[0].getMessage()
    assert str(client.getsockname()) in warnings[0].getMessage()

    # Nothing of the dropped datagram is left behind, and no reply went out for it.
    payload = bytes(range(256)) * 4
    assert deliver(server, client, payload) is True
    assert server.received == [payload]
    assert client.recv(100) == b"1024"
    assert server.oversized_datagrams == 1


def test_datagram_of_exactly_max_packet_size_is_delivered_intact(
    harness: Harness, client: socket.socket
) -> None:
    server = harness.make(servers.UDPServer, ("127.0.0.1", 0), Recording)
    server.received = []
    payload = bytes(i % 251 for i in range(server.max_packet_size))
    assert deliver(server, client, payload) is True
    assert server.received == [payload]
    assert deliver(server, client, payload + b"!") is True
    assert server.received == [payload]
    assert server.oversized_datagrams == 1
    assert client.recv(100) == str(len(payload)).encode()


def test_empty_datagram_is_a_request(harness: Harness, client: socket.socket) -> None:
    server = harness.make(RecordingUDPServer, ("127.0.0.1", 0), Recording)
    assert deliver(server, client, b"") is True
    assert server.received == [b""]
    assert client.recv(100) == b"0"


def test_oversized_warnings_are_rate_limited(
    harness: Harness, client: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="servers")
    server = harness.make(RecordingUDPServer, ("127.0.0.1", 0), Recording)
    for _ in range(50):
        assert deliver(server, client, b"y" * 2000) is True
    assert server.oversized_datagrams == 50
    assert server.received == []
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_unix_datagram_server_drops_oversized_too(harness: Harness, sockdir: Path) -> None:
    server = harness.make(servers.UnixDatagramServer, str(sockdir / "d.sock"), Recording)
    server.received = []
    server.max_packet_size = 100
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix_client:
        unix_client.bind(str(sockdir / "c.sock"))
        unix_client.settimeout(5)
        assert deliver(server, unix_client, b"z" * 101) is True
        assert deliver(server, unix_client, b"z" * 100) is True
        assert server.received == [b"z" * 100]
        assert server.oversized_datagrams == 1
        assert unix_client.recv(10) == b"100"
