"""Run one built-in service: `python3 -m servers SERVICE [ADDRESS] [--udp]`.

ADDRESS is HOST:PORT, [IPv6]:PORT or unix:PATH (default 127.0.0.1:7007). Stream services get a
thread per connection; datagram services are answered inline. Ctrl-C or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from typing import Any

from . import ThreadingTCPServer, UDPServer
from .services import BUILTIN_SERVICES


def parse_address(text: str) -> Any:
    """'127.0.0.1:7', '[::1]:7', 'unix:/run/x.sock' -> a server address."""
    error = ValueError(f"expected HOST:PORT, [IPv6]:PORT or unix:PATH, got {text!r}")
    if text.startswith("unix:"):
        if not text[5:]:
            raise error  # bind("") would autobind an abstract address nobody can name
        return text[5:]
    host, sep, port = text.rpartition(":")
    # A port beyond 65535 would reach bind() and fail there with an OverflowError traceback.
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise error
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host:
        raise error
    return (host, int(port))


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _record_only(signum: int, frame: object) -> None:
    """Installed so that the signal reaches the wakeup fd instead of its default action."""


class _ThreadingServer(ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m servers", description=__doc__)
    parser.add_argument("service", choices=sorted(BUILTIN_SERVICES))
    parser.add_argument("address", nargs="?", default="127.0.0.1:7007")
    parser.add_argument("--udp", action="store_true", help="serve datagrams instead of a stream")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        address = parse_address(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    service = BUILTIN_SERVICES[args.service]
    cls = UDPServer if args.udp else _ThreadingServer
    handler = service.dgram if args.udp else service.stream
    try:
        server = cls(address, handler)
    except OSError as exc:
        print(f"cannot serve {args.service} on {args.address}: {exc}", file=sys.stderr)
        return 1
    # Signal handlers only let the wakeup fd record the signal; the serving loop reads the signal
    # numbers and acts. A Python-level handler alone runs only when the main thread next executes
    # bytecode: serve_forever() blocks in select() with no timeout, so a signal that lands just
    # before it enters select() would never be acted on. The wakeup fd makes select() return.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def on_wakeup() -> None:
        try:
            signums = wake_r.recv(4096)
        except BlockingIOError:
            return
        if STOP_SIGNALS & set(signums):
            # shutdown() waits for the loop, so it must not run on the loop's own thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    server._watch_fd(wake_r.fileno(), on_wakeup)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record_only)
    with server:
        kind = "udp" if args.udp else "stream"
        logging.info("serving %s (%s) on %s", args.service, kind, server.server_address)
        try:
            server.serve_forever()
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
