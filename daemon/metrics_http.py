"""The optional HTTP endpoint for Prometheus: GET /metrics and GET /healthz.

One more server in the loop ([daemon] metrics_listen), served the way the control socket is: each
connection is non-blocking and watched by the loop, so a scraper that stalls costs only its own
connection. One request per connection (HTTP/1.0 style, Connection: close): enough for a scraper,
and nothing to keep alive.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

import servers

from .config import Address
from .control import ControlHost, LoopConnection

MAX_HEAD = 8192


class MetricsServer(servers.TCPServer):
    """Listens on metrics_listen; `metrics()` renders the exposition text at each scrape."""

    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: Address,
        host: ControlHost,
        metrics: Callable[[], str],
        healthy: Callable[[], bool],
        inherited: socket.socket | None = None,
    ) -> None:
        self.host = host
        self.metrics = metrics
        self.healthy = healthy
        self.connections: set[LoopConnection] = set()
        self.address_family = address.family
        super().__init__(address.sockaddr(), servers.BaseRequestHandler, inherited is None)
        if inherited is not None:
            self.adopt_socket(inherited)

    def process_request(self, request: Any, client_address: Any) -> None:
        request.setblocking(False)
        HttpConnection(request, self)

    def server_close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        super().server_close()


class HttpConnection(LoopConnection):
    idle_timeout = 10.0

    def __init__(self, sock: socket.socket, server: MetricsServer) -> None:
        self._server = server
        self._head = bytearray()
        super().__init__(sock, server.host, server.connections)

    def received(self, data: bytes) -> None:
        if self._closing:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            end = self._head.find(b"\n\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._respond(431, "text/plain", b"request header too large\n")
            return
        request_line = bytes(self._head.split(b"\n", 1)[0]).strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._respond(400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(405, "text/plain", b"only GET and HEAD\n", head=method == b"HEAD")
            return
        head_only = method == b"HEAD"
        if target == b"/metrics":
            body = self._server.metrics().encode()
            self._respond(200, CONTENT_TYPE_LATEST, body, head_only)
        elif target == b"/healthz":
            ok = self._server.healthy()
            self._respond(
                200 if ok else 503, "text/plain", b"ok\n" if ok else b"stopping\n", head_only
            )
        else:
            self._respond(404, "text/plain", b"not found: try /metrics or /healthz\n", head_only)

    def _respond(self, status: int, content_type: str, body: bytes, head: bool = False) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable",
        }[status]
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.send(header if head else header + body)
        self.close_when_sent()
