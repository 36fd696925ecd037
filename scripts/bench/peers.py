"""The stdlib peers selectd is measured against, each run as its own process.

Usage (the benchmark starts these itself; by hand, from scripts/):

    python3 -m bench.peers threading 127.0.0.1 20001
    python3 -m bench.peers forking 127.0.0.1 20001
    python3 -m bench.peers asyncio 127.0.0.1 20001
    python3 -m bench.peers uvloop 127.0.0.1 20001           # asyncio on uvloop (pip install uvloop)
    python3 -m bench.peers threading-many 127.0.0.1 20001 1000   # ports 20001..21000

Every server serves the same echo: recv up to 64 KiB, send it back, until the client closes.
EchoHandler below is it for the socketserver peers and for selectd itself (its targets load
`bench.peers:EchoHandler`); it is the same loop as selectd's built-in echo
(servers/services.py EchoStreamHandler), and asyncio runs that loop over streams.

This module uses the standard library only (uvloop is imported by its own peer alone), and nothing
from the bench package, so that what is measured is stock socketserver and asyncio. A peer runs
until it is sent SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import socketserver
import sys
import threading

# The peers' listen backlog: large enough that the kernel's accept queue is not what is measured.
BACKLOG = 1024

# How a client going away shows up in the echo loop; the handler ends quietly on any of these.
PEER_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class EchoHandler(socketserver.BaseRequestHandler):
    """Send back everything received until the client closes (same loop as EchoStreamHandler)."""

    def handle(self) -> None:
        recv, sendall = self.request.recv, self.request.sendall
        try:
            while data := recv(65536):
                sendall(data)
        except PEER_GONE:
            pass


class ThreadingEchoServer(socketserver.ThreadingTCPServer):
    """Stock ThreadingTCPServer; only the backlog and SO_REUSEADDR differ from the defaults."""

    allow_reuse_address = True
    request_queue_size = BACKLOG


class ForkingEchoServer(socketserver.ForkingTCPServer):
    """Stock ForkingTCPServer (max_children stays 40); only the backlog and SO_REUSEADDR differ."""

    allow_reuse_address = True
    request_queue_size = BACKLOG


def serve_socketserver(server_class: type[socketserver.TCPServer], host: str, port: int) -> None:
    """Serve the echo on (host, port) with server_class until SIGTERM."""
    # SIGTERM keeps its default action: the benchmark is done with the peer, and a graceful
    # server_close() would only add a join of the handler threads to the stop time.
    server = server_class((host, port), EchoHandler)
    server.serve_forever()


async def _asyncio_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except PEER_GONE:
        pass
    finally:
        writer.close()


async def _serve_asyncio(host: str, port: int) -> None:
    server = await asyncio.start_server(
        _asyncio_echo, host, port, backlog=BACKLOG, reuse_address=True
    )
    await server.serve_forever()


def serve_asyncio(host: str, port: int) -> None:
    """Serve the echo with asyncio streams on (host, port) until SIGTERM."""
    asyncio.run(_serve_asyncio(host, port))


def serve_uvloop(host: str, port: int) -> None:
    """The asyncio streams echo, run on uvloop's event loop (libuv) instead of asyncio's own."""
    import uvloop  # only this peer needs it; the others run wherever the stdlib does

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_asyncio(host, port))


def serve_threading_many(host: str, first_port: int, count: int) -> None:
    """Serve count ThreadingTCPServers on consecutive ports, each serve_forever in its own thread.

    This is how N services look without a super-server: N accept loops, each polling every
    0.5 s in serve_forever.
    """
    # Blocked before the threads start, so they inherit the mask and only sigwait() sees SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    servers = [ThreadingEchoServer((host, first_port + i), EchoHandler) for i in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def main(argv: list[str]) -> int:
    """Entry point: KIND HOST PORT [COUNT]."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    kind, host, port = argv[0], argv[1], int(argv[2])
    if kind == "threading":
        serve_socketserver(ThreadingEchoServer, host, port)
    elif kind == "forking":
        serve_socketserver(ForkingEchoServer, host, port)
    elif kind == "asyncio":
        serve_asyncio(host, port)
    elif kind == "uvloop":
        serve_uvloop(host, port)
    elif kind == "threading-many":
        serve_threading_many(host, port, int(argv[3]))
    else:
        print(f"unknown peer {kind!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
