"""Connection sockets that hold a client to its server's `timeout`, and the watchdog that helps.

`timeout` makes two promises (README, "Timeouts"): a client that stops reading, stops sending,
or trickles a request a byte at a time cannot hold a worker for longer. How each is kept
decides what every recv and send costs:

- Sends: SO_SNDTIMEO on the blocking socket, everywhere. It costs nothing until a send blocks.
- TCP connections served by a thread or fork pool are `Connection`s: recv and send are the C
  methods, untouched, and the socket has no SO_RCVTIMEO (whose timer a blocking recv would arm
  on every wait). The `Watchdog`, run by the loop every quarter `timeout` while the pool has
  requests, reads each connection's TCP_INFO: a connection that has been sent nothing for
  `timeout` (since its request started, or since the last data sent), whether its client is
  silent or trickling, is shut for reading. The handler then sees end of file (a stdlib rfile
  reader sees `RequestCut`, a TimeoutError, so that half a line is never taken for a whole one)
  and may still send its reply.
- Unix stream connections (no TCP_INFO) and inline servers (whose handler holds the loop, so no
  watchdog can run) are `IOTimeoutSocket`s with SO_RCVTIMEO too: each recv checks the request
  deadline itself, and each send moves it on. That costs a Python call per I/O.

An expired SO_RCVTIMEO/SO_SNDTIMEO surfaces as EAGAIN: BlockingIOError from a direct recv/send,
TimeoutError from an rfile reader and from IOTimeoutSocket. The servers log either as
`request_timeout`.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .log import format_address, get_logger

log = get_logger()

# struct tcp_info (linux/tcp.h): tcpi_state is byte 0; tcpi_last_data_sent, in milliseconds, is
# the u32 at offset 44 (after 8 bytes of u8 fields and 9 u32s).
_TCP_INFO_LEN = 48
_LAST_DATA_SENT = struct.Struct("I")
_LAST_DATA_SENT_OFFSET = 44
# States in which the peer has not sent its FIN yet: end of file then means our shutdown.
_PEER_OPEN_STATES = frozenset({1, 4, 5})  # ESTABLISHED, FIN_WAIT1, FIN_WAIT2

# Serialises a pool thread's close of a Connection with the watchdog's use of its descriptor,
# so that the watchdog never touches a number some other thread has just been given.
_FD_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    # A fork worker forked while a pool thread was closing a connection would inherit the lock
    # held, by a thread it does not have, and hang on its first close.
    global _FD_LOCK
    _FD_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send = socket.socket.send
_sendall = socket.socket.sendall


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def set_io_timeout(sock: socket.socket, seconds: float, recv: bool = True) -> None:
    """Blocking send (and recv, unless `recv` is false: then it never gives up) on `sock` give
    up after `seconds` (EAGAIN), with no per-call cost."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds if recv else 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))


class RequestCut(TimeoutError):
    """The watchdog shut the connection for reading: nothing was sent to it for `timeout`."""


def is_timeout(exc: BaseException | None) -> bool:
    """Whether a handler's exception is a client outliving `timeout` (not a handler bug)."""
    return isinstance(exc, (TimeoutError, BlockingIOError))


class Connection(socket.socket):
    """A pool's TCP connection: the C recv/send, plus what makes `timeout` safe for rfile.

    Only recv_into is Python, for the stdlib's buffered readers (StreamRequestHandler.rfile):
    the watchdog's shutdown would otherwise read as end of file, and an expired receive
    timeout (EAGAIN, should a handler set SO_RCVTIMEO) as "no data yet"; either would hand the
    handler half a line as a whole one.
    """

    __slots__ = ()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            n = _recv_into(self, buffer, nbytes, flags)
        except BlockingIOError:
            if flags & socket.MSG_DONTWAIT:
                raise  # asked not to wait: "no data yet" is the answer, not a timeout
            raise TimeoutError("timed out") from None
        if n == 0 and (nbytes or len(buffer)) and was_cut(self):
            raise RequestCut("cut off: nothing was sent to the client within the timeout")
        return n

    def _real_close(self, _close: Any = socket.socket._real_close) -> None:  # type: ignore[attr-defined]
        with _FD_LOCK:
            _close(self)


def was_cut(sock: socket.socket) -> bool:
    """After a read of end of file: whether it was our shutdown, the peer still being open."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return False
    return state in _PEER_OPEN_STATES


def quiet_seconds(sock: socket.socket) -> float | None:
    """Seconds since the kernel last sent data on `sock` (or since it was set up, when it has
    sent none); None when the socket is closed or not TCP."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    return _LAST_DATA_SENT.unpack_from(info, _LAST_DATA_SENT_OFFSET)[0] / 1000.0


def shut(sock: socket.socket, how: int) -> bool:
    """shutdown(how) on a socket another thread may be closing; False if it already was.

    Under the lock a Connection's close takes, so the number is never one just reused for
    something else.
    """
    with _FD_LOCK:
        if sock.fileno() < 0:
            return False
        try:
            sock.shutdown(how)
        except OSError:
            return False
    return True


class IOTimeoutSocket(socket.socket):
    """A connection that enforces its own request deadline, for where no watchdog can.

    Two rules, both raising TimeoutError as settimeout() would:

    - No single wait lasts longer than `timeout`: SO_RCVTIMEO/SO_SNDTIMEO, whose EAGAIN is
      turned into TimeoutError here.
    - A request must arrive within `timeout` of the connection opening or of the last reply:
      every recv checks that deadline, and every send moves it on.

    The cost is one Python call and a clock read per I/O, far less than the poll() that
    settimeout() adds to every recv. (The C methods are bound once, above: a super() lookup per
    call would cost as much again.)
    """

    __slots__ = ("_deadline", "_timeout")

    def start_clock(self, timeout: float) -> None:
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def _check(self) -> None:
        if time.monotonic() > self._deadline:
            raise TimeoutError(f"no complete request within {self._timeout}s")

    def recv(self, *args: Any) -> bytes:
        self._check()
        try:
            return _recv(self, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def recv_into(self, *args: Any) -> int:
        self._check()
        try:
            return _recv_into(self, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def send(self, *args: Any) -> int:
        try:
            sent = _send(self, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        self._deadline = time.monotonic() + self._timeout
        return sent

    def sendall(self, *args: Any) -> None:
        try:
            _sendall(self, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        self._deadline = time.monotonic() + self._timeout


# A running request as the watchdog sees it: its socket, its client, and when it started
# (time.monotonic()).
Running = tuple[socket.socket, Any, float]


class Watchdog:
    """Cuts off a pool's TCP connections that have been sent nothing for `timeout` seconds.

    `running` lists the pool's requests now in a handler; `call_later` is the loop's timer. The
    owner calls arm() when a request starts: the watchdog then looks every `timeout / 4` seconds
    until the pool has nothing running, so an idle daemon never wakes for it. It runs in the
    loop's thread.
    """

    def __init__(
        self,
        server_name: str,
        timeout: float,
        running: Callable[[], Iterable[Running]],
        call_later: Callable[[float, Callable[[], None]], Any],
    ) -> None:
        self.server_name = server_name
        self.timeout = timeout
        self.period = max(timeout / 4, 0.05)
        self._running = running
        self._call_later = call_later
        self._timer: Any = None
        self._cut: set[socket.socket] = set()  # shut already, and still running last time

    @classmethod
    def for_server(
        cls,
        server: Any,
        running: Callable[[], Iterable[Running]],
        call_later: Callable[[float, Callable[[], None]], Any],
    ) -> Watchdog | None:
        """The watchdog for a pool of `server` (a ManagedMixIn), or None when its connections
        keep `timeout` by themselves (not server.watched())."""
        if not server.watched():
            return None
        return cls(server.name, server.config.timeout, running, call_later)

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._call_later(self.period, self._sweep)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        seen = set()
        for sock, client_address, started in self._running():
            seen.add(sock)
            if sock in self._cut:
                continue
            with _FD_LOCK:
                quiet = quiet_seconds(sock)  # None once closed
            if quiet is None or min(quiet, now - started) < self.timeout:
                continue
            if not shut(sock, socket.SHUT_RD):
                continue
            self._cut.add(sock)
            log.warning(
                "request_timeout",
                server=self.server_name,
                client=format_address(client_address),
                timeout=self.timeout,
                reason="nothing sent to the client",
            )
        self._cut &= seen
        if seen:
            self.arm()
