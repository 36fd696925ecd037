"""Stream transports: the address picks the family, and a bound Unix socket file is cleaned up."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from servers_testing import (
    DatagramUpperHandler,
    Harness,
    LineEchoHandler,
    line_request,
    requires_ipv6,
)

import servers
from servers.stream import family_for_address


@requires_ipv6
def test_tcp_server_serves_ipv6_without_subclassing(harness: Harness) -> None:
    server = harness.make(servers.TCPServer, ("::1", 0), LineEchoHandler)
    assert server.socket.family == socket.AF_INET6
    assert server.server_address[0] == "::1"
    harness.serve(server)
    host, port = server.server_address[:2]
    assert line_request((host, port), b"six\n") == b"SIX\n"


@requires_ipv6
def test_threading_udp_server_serves_ipv6(harness: Harness) -> None:
    server = harness.make(servers.ThreadingUDPServer, ("::1", 0), DatagramUpperHandler)
    assert server.socket.family == socket.AF_INET6
    harness.serve(server)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"six", server.server_address[:2])
        assert client.recv(100) == b"SIX"


def test_ipv4_and_host_names_keep_the_class_family(harness: Harness) -> None:
    assert harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler).socket.family == (
        socket.AF_INET
    )
    assert harness.make(servers.TCPServer, ("localhost", 0), LineEchoHandler).socket.family == (
        socket.AF_INET
    )


@pytest.mark.parametrize(
    ("address", "family"),
    [
        (("::1", 0), socket.AF_INET6),
        (("fe80::1%lo", 0), socket.AF_INET6),
        (("::ffff:127.0.0.1", 0), socket.AF_INET6),
        (("127.0.0.1", 0), socket.AF_INET),
        (("", 0), socket.AF_INET),
        (("not:an:address", 0), socket.AF_INET),
        ("/run/x.sock", socket.AF_UNIX),
        (b"/run/x.sock", socket.AF_UNIX),
        (Path("/run/x.sock"), socket.AF_UNIX),
    ],
)
def test_family_for_address(address: Any, family: int) -> None:
    assert family_for_address(address, socket.AF_INET) == family


@pytest.mark.parametrize("kind", [str, Path, os.fsencode])
def test_unix_stream_server_takes_str_path_and_bytes(
    harness: Harness, sockdir: Path, kind: Any
) -> None:
    path = sockdir / "stream.sock"
    server = harness.make(servers.UnixStreamServer, kind(path), LineEchoHandler)
    assert server.socket.family == socket.AF_UNIX
    assert path.is_socket()
    harness.serve(server)
    assert line_request(str(path), b"unix\n") == b"UNIX\n"


def test_tcp_server_with_a_path_is_a_unix_stream_server(harness: Harness, sockdir: Path) -> None:
    path = str(sockdir / "tcp.sock")
    server = harness.make(servers.ThreadingTCPServer, path, LineEchoHandler)
    assert server.socket.family == socket.AF_UNIX
    assert server.socket.type == socket.SOCK_STREAM
    harness.serve(server)
    assert line_request(path, b"path\n") == b"PATH\n"


def test_server_close_removes_the_socket_file(sockdir: Path) -> None:
    for cls, kind in [
        (servers.UnixStreamServer, socket.SOCK_STREAM),
        (servers.UnixDatagramServer, socket.SOCK_DGRAM),
    ]:
        path = sockdir / f"{kind.name}.sock"
        server = cls(str(path), LineEchoHandler)
        assert server.socket.type == kind
        assert path.is_socket()
        server.server_close()
        assert not path.exists()
        server.server_close()  # twice is harmless


def test_server_close_leaves_a_socket_that_replaced_its_own(sockdir: Path) -> None:
    path = sockdir / "shared.sock"
    server = servers.UnixStreamServer(str(path), LineEchoHandler)
    # Someone else (a new instance during a restart, say) took over the path meanwhile.
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))
        successor.listen()
        server.server_close()
        assert path.is_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still the successor's, and still reachable
    os.unlink(path)


def test_server_close_leaves_a_regular_file_that_replaced_the_socket(sockdir: Path) -> None:
    path = sockdir / "file"
    server = servers.UnixStreamServer(str(path), LineEchoHandler)
    os.unlink(path)
    path.write_text("not a socket")
    server.server_close()
    assert path.read_text() == "not a socket"


def test_failed_bind_does_not_remove_the_existing_socket(sockdir: Path) -> None:
    path = sockdir / "taken.sock"
    with servers.UnixStreamServer(str(path), LineEchoHandler) as first:
        with pytest.raises(OSError):
            servers.UnixStreamServer(str(path), LineEchoHandler)
        assert path.is_socket()
        assert first.fileno() >= 0
    assert not path.exists()


def test_abstract_unix_socket_has_no_file_to_remove(harness: Harness) -> None:
    name = f"\0servers-test-{os.getpid()}"
    server = harness.make(servers.UnixStreamServer, name, LineEchoHandler)
    harness.serve(server)
    assert line_request(name, b"abstract\n") == b"ABSTRACT\n"


def test_listener_is_non_blocking_and_connections_are_blocking(harness: Harness) -> None:
    server = harness.make(servers.TCPServer, ("127.0.0.1", 0), LineEchoHandler)
    assert server.socket.getblocking() is False
    seen: list[bool] = []

    class Probe(servers.BaseRequestHandler):
        def handle(self) -> None:
            seen.append(self.request.getblocking())

    server.RequestHandlerClass = Probe
    with socket.create_connection(server.server_address, timeout=5):
        server.handle_request()
    assert seen == [True]
