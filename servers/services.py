"""The classic inetd internal services, as request handlers for stream and datagram servers.

echo (RFC 862), discard (RFC 863), chargen (RFC 864), daytime (RFC 867), time (RFC 868).
BUILTIN_SERVICES maps each name to its stream and datagram handler; selectd's config refers to them
by these names.

The stream handlers talk to the socket directly (no rfile/wfile): each service is a byte stream,
not lines, and the echo loop is the hot path of every benchmark.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .handlers import BaseRequestHandler

# Seconds between 1900-01-01 (RFC 868's epoch) and 1970-01-01 (the Unix epoch).
RFC868_EPOCH_OFFSET = 2_208_988_800

# RFC 864: the 95 printable ASCII characters, 72 to a line, each line starting one further on.
_CHARGEN_CHARS = bytes(range(32, 127))
_CHARGEN_LINE = 72
_CHARGEN_DGRAM_MAX = 512

# Errors that end a stream service quietly: the client went away, or did not keep up within the
# connection's timeout (settimeout() raises TimeoutError; SO_RCVTIMEO/SO_SNDTIMEO on a blocking
# socket surface as EAGAIN, i.e. BlockingIOError).
_PEER_GONE = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
    BlockingIOError,
)


def chargen_line(n: int) -> bytes:
    """Line n (0-based) of the RFC 864 pattern, with CRLF."""
    start = n % len(_CHARGEN_CHARS)
    doubled = _CHARGEN_CHARS + _CHARGEN_CHARS
    return doubled[start : start + _CHARGEN_LINE] + b"\r\n"


def daytime_text(now: float | None = None) -> bytes:
    """RFC 867 leaves the format free; this is the common one: 'Tuesday, November 24, 2026 ...'."""
    t = time.localtime(now)
    return time.strftime("%A, %B %d, %Y %H:%M:%S-%Z", t).encode("ascii", "replace") + b"\r\n"


def time_bytes(now: float | None = None) -> bytes:
    """RFC 868: seconds since 1900-01-01 00:00 UTC, 32-bit big-endian (wraps in 2036)."""
    seconds = int(time.time() if now is None else now) + RFC868_EPOCH_OFFSET
    return (seconds % 2**32).to_bytes(4, "big")


class EchoStreamHandler(BaseRequestHandler):
    """RFC 862: send back everything received, until the client closes."""

    def handle(self) -> None:
        recv, sendall = self.request.recv, self.request.sendall
        try:
            while data := recv(65536):
                sendall(data)
        except _PEER_GONE:
            pass


class EchoDatagramHandler(BaseRequestHandler):
    """RFC 862: send back each datagram."""

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class DiscardStreamHandler(BaseRequestHandler):
    """RFC 863: read and throw away everything, until the client closes."""

    def handle(self) -> None:
        recv = self.request.recv
        try:
            while recv(65536):
                pass
        except _PEER_GONE:
            pass


class DiscardDatagramHandler(BaseRequestHandler):
    """RFC 863: throw the datagram away; no reply."""


class ChargenStreamHandler(BaseRequestHandler):
    """RFC 864: send the rotating character pattern until the client closes."""

    def handle(self) -> None:
        block = b"".join(chargen_line(n) for n in range(len(_CHARGEN_CHARS)))
        try:
            while True:
                self.request.sendall(block)
        except _PEER_GONE:
            pass


class ChargenDatagramHandler(BaseRequestHandler):
    """RFC 864: answer each datagram with 0 to 512 characters of the pattern."""

    def handle(self) -> None:
        _data, sock = self.request
        size = random.randint(0, _CHARGEN_DGRAM_MAX)
        lines = b"".join(chargen_line(n) for n in range(size // (_CHARGEN_LINE + 2) + 1))
        sock.sendto(lines[:size], self.client_address)


class DaytimeStreamHandler(BaseRequestHandler):
    """RFC 867: send the date and time as text, then close."""

    def handle(self) -> None:
        try:
            self.request.sendall(daytime_text())
        except _PEER_GONE:
            pass


class DaytimeDatagramHandler(BaseRequestHandler):
    """RFC 867: answer each datagram with the date and time as text."""

    def handle(self) -> None:
        _data, sock = self.request
        sock.sendto(daytime_text(), self.client_address)


class TimeStreamHandler(BaseRequestHandler):
    """RFC 868: send the time as 4 bytes, then close."""

    def handle(self) -> None:
        try:
            self.request.sendall(time_bytes())
        except _PEER_GONE:
            pass


class TimeDatagramHandler(BaseRequestHandler):
    """RFC 868: answer each datagram with the time as 4 bytes."""

    def handle(self) -> None:
        _data, sock = self.request
        sock.sendto(time_bytes(), self.client_address)


@dataclass(frozen=True)
class Service:
    """A built-in service: its handler for stream servers and for datagram servers."""

    name: str
    stream: type[BaseRequestHandler]
    dgram: type[BaseRequestHandler]


BUILTIN_SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service("echo", EchoStreamHandler, EchoDatagramHandler),
        Service("discard", DiscardStreamHandler, DiscardDatagramHandler),
        Service("chargen", ChargenStreamHandler, ChargenDatagramHandler),
        Service("daytime", DaytimeStreamHandler, DaytimeDatagramHandler),
        Service("time", TimeStreamHandler, TimeDatagramHandler),
    )
}
