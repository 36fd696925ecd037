"""The built-in inetd services over real TCP and UDP loopback sockets."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from servers_testing import Harness, LogRecords, recv_until_eof

import servers
from servers.services import BUILTIN_SERVICES

PRINTABLE = bytes(range(32, 127))


def with_finish_event(handler: type[Any]) -> type[Any]:
    """The service's handler, setting server.finished once it has run to the end."""

    class Watched(handler):  # type: ignore[misc,valid-type]
        def finish(self) -> None:
            super().finish()
            self.server.finished.set()

    return Watched


@pytest.fixture
def stream(harness: Harness) -> Any:
    """stream(name) -> a threading TCP server running that service, with a `finished` event."""

    def start(name: str) -> Any:
        handler = with_finish_event(BUILTIN_SERVICES[name].stream)
        server = harness.make(servers.ThreadingTCPServer, ("127.0.0.1", 0), handler)
        server.finished = threading.Event()
        harness.serve(server)
        return server

    return start


@pytest.fixture
def dgram(harness: Harness) -> Any:
    """dgram(name) -> a UDP server running that service, with a `finished` event."""

    def start(name: str) -> Any:
        handler = with_finish_event(BUILTIN_SERVICES[name].dgram)
        server = harness.make(servers.UDPServer, ("127.0.0.1", 0), handler)
        server.finished = threading.Event()
        harness.serve(server)
        return server

    return start


@pytest.fixture
def udp_client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        yield client


@pytest.fixture(autouse=True)
def no_service_errors() -> Iterator[None]:
    """A service never logs a warning or an error in these tests, clients closing included.

    Autouse, so it is set up before `harness` and checks after the harness has joined every
    handler thread: an error logged as a handler ends is not missed.
    """
    records = LogRecords()
    logger = logging.getLogger("servers")
    logger.addHandler(records)
    try:
        yield
    finally:
        logger.removeHandler(records)
    assert records.warnings() == []


def connect(server: Any) -> socket.socket:
    return socket.create_connection(server.server_address, timeout=5)


def test_all_five_services_are_built_in() -> None:
    assert sorted(BUILTIN_SERVICES) == ["chargen", "daytime", "discard", "echo", "time"]


# --- echo -------------------------------------------------------------------------------------


def test_echo_stream_returns_bytes_exactly(stream: Any) -> None:
    server = stream("echo")
    with connect(server) as client:
        for message in (b"a", b"\x00\xff\r\n", bytes(range(256)) * 16):
            client.sendall(message)
            received = b""
            while len(received) < len(message):
                received += client.recv(65536)
            assert received == message


def test_echo_stream_returns_a_mebibyte_intact(stream: Any) -> None:
    server = stream("echo")
    payload = os.urandom(1 << 20)
    with connect(server) as client:
        # Send from a thread while reading here: echo sends back as it reads, so a client that
        # only sent would fill both directions' buffers and deadlock with the server.
        def send() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            received = recv_until_eof(client)
        finally:
            sender.join(10)
    assert len(received) == len(payload)
    assert received == payload
    assert server.finished.wait(5)


@pytest.mark.parametrize("size", [0, 1, 1000, 8192])
def test_echo_datagram_returns_bytes_exactly(
    dgram: Any, udp_client: socket.socket, size: int
) -> None:
    server = dgram("echo")
    payload = os.urandom(size)
    udp_client.sendto(payload, server.server_address)
    assert udp_client.recvfrom(65536) == (payload, server.server_address)


# --- discard ----------------------------------------------------------------------------------


def test_discard_stream_returns_nothing_and_stays_usable(stream: Any) -> None:
    server = stream("discard")
    with connect(server) as client:
        for _ in range(5):
            client.sendall(os.urandom(100_000))  # far beyond the buffers: it is being read
        assert not server.finished.is_set()
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b""
    assert server.finished.wait(5)


def test_discard_datagram_sends_no_reply(dgram: Any, udp_client: socket.socket) -> None:
    server = dgram("discard")
    udp_client.sendto(b"into the void", server.server_address)
    assert server.finished.wait(5)
    # A reply would have been sent before finish() and loopback delivers at once.
    udp_client.setblocking(False)
    with pytest.raises(BlockingIOError):
        udp_client.recv(100)


# --- chargen ----------------------------------------------------------------------------------


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    buffer = b""
    while buffer.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        assert chunk, "chargen closed the connection"
        buffer += chunk
    return buffer.split(b"\r\n")[:count]


def test_chargen_stream_sends_the_rfc864_pattern(stream: Any) -> None:
    server = stream("chargen")
    with connect(server) as client:
        lines = read_lines(client, 200)
    for line in lines:
        assert len(line) == 72
        assert set(line) <= set(PRINTABLE)
    for previous, line in itertools.pairwise(lines):
        assert line[:71] == previous[1:]  # each line starts one character further on
        assert PRINTABLE.index(line[0]) == (PRINTABLE.index(previous[0]) + 1) % 95
    assert lines[95] == lines[0]  # the ring of 95 printable characters comes round
    assert server.finished.wait(5)  # the client went away: the handler ended, quietly


def test_chargen_stream_stops_when_the_client_stops_reading(stream: Any) -> None:
    server = stream("chargen")
    with connect(server) as client:
        client.recv(10)
        client.shutdown(socket.SHUT_RDWR)
    assert server.finished.wait(5)


def test_chargen_datagram_answers_with_up_to_512_bytes_of_the_pattern(
    dgram: Any, udp_client: socket.socket
) -> None:
    server = dgram("chargen")
    pattern = b"".join(
        (PRINTABLE * 2)[n : n + 72] + b"\r\n" for n in range(8)
    )  # more than 512 bytes of lines 0, 1, 2, ...
    sizes = set()
    for _ in range(20):
        udp_client.sendto(b"", server.server_address)
        reply = udp_client.recv(4096)
        assert len(reply) <= 512
        assert reply == pattern[: len(reply)]
        sizes.add(len(reply))
    assert len(sizes) > 1  # 0..512 at random: twenty equal sizes would mean it is not random


# --- daytime ----------------------------------------------------------------------------------


def assert_daytime(text: bytes) -> None:
    assert text.endswith(b"\r\n")
    assert text.isascii()
    body = text[:-2].decode("ascii")
    assert body and "\r" not in body and "\n" not in body
    assert str(time.localtime().tm_year) in body


def test_daytime_stream_sends_ascii_text_ending_crlf_then_closes(stream: Any) -> None:
    server = stream("daytime")
    with connect(server) as client:
        assert_daytime(recv_until_eof(client))


def test_daytime_datagram(dgram: Any, udp_client: socket.socket) -> None:
    server = dgram("daytime")
    udp_client.sendto(b"", server.server_address)
    assert_daytime(udp_client.recv(4096))


# --- time -------------------------------------------------------------------------------------


def assert_rfc868(reply: bytes) -> None:
    assert len(reply) == 4
    expected = int(time.time()) + 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
    assert abs(int.from_bytes(reply, "big") - expected) <= 3


def test_time_stream_sends_four_big_endian_bytes_then_closes(stream: Any) -> None:
    server = stream("time")
    with connect(server) as client:
        assert_rfc868(recv_until_eof(client))


def test_time_datagram(dgram: Any, udp_client: socket.socket) -> None:
    server = dgram("time")
    udp_client.sendto(b"", server.server_address)
    assert_rfc868(udp_client.recv(100))
