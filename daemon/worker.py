"""The fork-pool worker: the child side of the handoff protocol.

The supervisor accepts and verifies each connection, then passes it to an idle worker over the
worker's end of a Unix socketpair with SCM_RIGHTS. The message that carries the descriptor holds
the client address (marshal: tuples of str and int, nothing executable). The worker runs the
handler, closes the connection, and answers one message: a status byte, DONE_OK or DONE_FAILED,
and, when the worker is retiring after this request (max_requests, max_rss), a second byte with
the reason. That answer is what tells the supervisor the worker is free again (or going).
While idle, a worker with a heartbeat interval sends HEARTBEAT when it has had nothing to do
for that long, so the supervisor can tell an idle worker from a wedged one.

When the supervisor closes its end, the worker reads EOF between requests and exits 0: that is
how a pool retires its workers gracefully.
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .log import get_logger

DONE_OK = b"\x00"
DONE_FAILED = b"\x01"
HEARTBEAT = b"\x02"
RETIRE_REQUESTS = b"\x03"
RETIRE_RSS = b"\x04"
RETIRE_REASONS = {RETIRE_REQUESTS[0]: "max_requests", RETIRE_RSS[0]: "max_rss"}
_MAX_MESSAGE = 4096


def send_request(channel: socket.socket, request: socket.socket, client_address: Any) -> None:
    """Supervisor side: hand `request` to the worker at the other end of `channel`."""
    socket.send_fds(channel, [marshal.dumps(client_address)], [request.fileno()])


def detach_inherited(keep: set[int]) -> None:
    """In a new child: close every descriptor but stdio and `keep`.

    A worker that kept the supervisor's listeners open would keep their ports accepting after
    the supervisor closed them (stop would not refuse connections); one that kept another
    connection open would keep its client from ever seeing EOF. So everything goes. Python
    socket objects that still name those numbers are detached first, so that nothing closes a
    reused number later by mistake.
    """
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket):
            fd = obj.fileno()
            if fd > 2 and fd not in keep:
                obj.detach()
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 2**31 - 1)


@dataclass(frozen=True)
class Limits:
    """When a worker retires on its own, and how often it says it is alive."""

    max_requests: int | None = None
    max_rss: int | None = None
    heartbeat: float | None = None


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_main(
    run_request: Callable[[Any, Any], bool],
    connection: Callable[[int], socket.socket],
    channel: socket.socket,
    limits: Limits = Limits(),
) -> None:
    """Serve requests handed over `channel` until it closes; never returns."""
    status = 0
    try:
        # The terminal's Ctrl-C reaches the whole process group; only the supervisor decides
        # what it means. SIGTERM keeps its default action: the supervisor's "stop now".
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # What the supervisor built before the fork lives on, shared copy-on-write; the
        # collector would otherwise touch (and so copy) every page of it.
        gc.freeze()
        served = 0
        if limits.heartbeat:
            channel.settimeout(limits.heartbeat)
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(channel, _MAX_MESSAGE, 1)
            except InterruptedError:
                continue
            except TimeoutError:
                channel.sendall(HEARTBEAT)
                continue
            except ConnectionResetError:
                break
            if not fds:
                if not message:
                    break  # the supervisor closed our channel: retire
                continue
            request = connection(fds[0])
            client_address = _address(message)
            ok = run_request(request, client_address)
            served += 1
            retire = b""
            if limits.max_requests and served >= limits.max_requests:
                retire = RETIRE_REQUESTS
            elif limits.max_rss and _rss() > limits.max_rss:
                retire = RETIRE_RSS
            channel.sendall((DONE_OK if ok else DONE_FAILED) + retire)
            if retire:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the supervisor is gone: nobody to serve for
    except BaseException as exc:
        status = 1
        get_logger().error("worker_crashed", exc_type=type(exc).__name__, exc_info=True)
    finally:
        os._exit(status)


def _address(message: bytes) -> Any:
    try:
        return marshal.loads(message)
    except (EOFError, ValueError, TypeError):
        return None
