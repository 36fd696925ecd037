"""Datagram transports: UDPServer (IPv4 and IPv6) and UnixDatagramServer.

A request is (data, socket): the datagram and the server's own socket, for the reply.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from .base import RequestDropped
from .ratelimit import RateLimiter
from .stream import TCPServer

logger = logging.getLogger("servers")


class UDPServer(TCPServer):
    """UDP server class.

    A datagram longer than max_packet_size is not handed to the handler truncated: it is dropped,
    counted in `oversized_datagrams` and logged (rate-limited).
    """

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size = 8192

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        self.oversized_datagrams = 0
        self._oversize_log = RateLimiter()
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)

    def get_request(self) -> tuple[Any, Any]:
        # recvmsg() rather than recvfrom(): only its flags say whether the kernel cut the datagram.
        data, _ancdata, flags, client_addr = self.socket.recvmsg(self.max_packet_size)
        if flags & socket.MSG_TRUNC:
            self.oversized_datagrams += 1
            suppressed = self._oversize_log.allow()
            if suppressed is not None:
                logger.warning(
                    "dropped a datagram from %s longer than max_packet_size=%d on %r "
                    "(%d more suppressed)",
                    client_addr,
                    self.max_packet_size,
                    self.server_address,
                    suppressed,
                    extra={"client_address": client_addr, "server_address": self.server_address},
                )
            raise RequestDropped
        return (data, self.socket), client_addr

    def server_activate(self) -> None:
        # No need to call listen() for UDP.
        pass

    def shutdown_request(self, request: Any) -> None:
        # No need to shutdown anything.
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        # No need to close anything.
        pass


class UnixDatagramServer(UDPServer):
    """A datagram server on a Unix socket; server_address is its path."""

    address_family = socket.AF_UNIX
