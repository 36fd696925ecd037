"""servers: Python's socketserver API, rebuilt for a selectors loop.

Every public name of CPython's socketserver (3.11 to 3.13), with the same signatures and
semantics, so code ports by changing one import (`import servers as socketserver`). What is better
than the stdlib:

- serve_forever() never polls: it blocks in its selector and shutdown() wakes it through a wakeup
  socket, so idle servers cost no wake-ups.
- handle_ready() is the public non-blocking step for a foreign selectors loop: call it when fileno()
  is readable; spurious readiness is a no-op. serve_forever() and handle_request() use it too.
- The address family follows the address: ("::1", 0) is IPv6, a path is AF_UNIX.
- handle_error() logs to the "servers" logger with the traceback and the client address.
- accept() capacity errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) are logged rate-limited and back off
  (accept_backoff()), so the loop never spins.
- A datagram longer than max_packet_size is dropped and logged, never handed over truncated.
- ForkingMixIn reaps only its own children, through pidfds, and never blocks the loop in waitpid.

Layering: ratelimit, wakeup <- base (BaseServer) <- stream, datagram (transports) <- mixins
<- this module (the combinations); handlers and services stand apart. Standard library only.
"""

from __future__ import annotations

from .base import ACCEPT_CAPACITY_ERRNOS, SPURIOUS_ERRNOS, BaseServer, RequestDropped
from .datagram import UDPServer, UnixDatagramServer
from .handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from .mixins import ForkingMixIn, ThreadingMixIn
from .stream import TCPServer, UnixStreamServer

__version__ = "0.1.0"

__all__ = [
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "StreamRequestHandler",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixDatagramServer",
    "ThreadingUnixStreamServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
]

# Names beyond the stdlib's, for selectors-loop users.
__all__ += ["ACCEPT_CAPACITY_ERRNOS", "SPURIOUS_ERRNOS", "RequestDropped"]


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
