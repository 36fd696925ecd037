"""Connection sockets that hold a client to its server's `timeout`, and the watchdog that helps.

`timeout` makes two promises (README, "Timeouts"): a client that stops reading, stops sending,
or trickles a request a byte at a time cannot hold a worker for longer. How each is kept
decides what every recv and send costs:

- Sends: SO_SNDTIMEO on the blocking socket, everywhere. It costs nothing until a send blocks.
- TCP connections served by a thread or fork pool are `Connection`s: recv and send are the C
  methods, untouched, and the socket has no SO_RCVTIMEO (whose timer a blocking recv would arm
  on every wait). The `Watchdog`, run by the loop every quarter `timeout` while the pool has
  requests, reads each connection's TCP_INFO and looks only at those that have been sent
  nothing for `timeout` (since their request started, or since the last data sent):
  - data waiting in the send queue: the client stopped reading. The connection is shut both
    ways, so a send that waits (one SO_SNDTIMEO wait after another, each let through by a few
    bytes) fails at once.
  - the handler blocked waiting to read this connection (/proc: the syscall its thread is in,
    and the descriptors a read, poll, select or epoll waits on): the client is silent or
    trickling. The connection is shut for reading; the handler sees end of
    file (a stdlib rfile reader sees `RequestCut`, a TimeoutError, so that half a line is
    never taken for a whole one).
  - the handler doing anything else (computing, waiting on a backend): the client is owed a
    reply, and keeps its connection.
- Unix stream connections (no TCP_INFO) and inline servers (whose handler holds the loop, so no
  watchdog can run) are `IOTimeoutSocket`s with SO_RCVTIMEO too: each recv checks the request
  deadline itself, and each send moves it on. That costs a Python call per I/O.

An expired SO_RCVTIMEO/SO_SNDTIMEO surfaces as EAGAIN: BlockingIOError from a direct recv/send,
TimeoutError from an rfile reader and from IOTimeoutSocket. The servers log either as
`request_timeout`.
"""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import struct
import termios
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
# States after our own shutdown for writing (FIN_WAIT1, FIN_WAIT2, CLOSING): EPIPE then is it.
_WE_SHUT_STATES = frozenset({4, 5, 11})

# What a handler's thread can be blocked in while it waits for input, by the kernel's syscall
# numbers for this machine, and where those say which descriptors: "read" (read, readv, recvfrom,
# recvmsg, recvmmsg: the first argument), "poll" (poll, ppoll: a pollfd array and its length),
# "select" (select, pselect6: the count and the read set) and "epoll" (epoll_wait, epoll_pwait,
# epoll_pwait2: the epoll descriptor, whose interest list /proc shows).
_WAIT_CALLS: dict[int, str] = {
    "x86_64": {
        **dict.fromkeys((0, 19, 45, 47, 299), "read"),
        **dict.fromkeys((7, 271), "poll"),
        **dict.fromkeys((23, 270), "select"),
        **dict.fromkeys((232, 281, 441), "epoll"),
    },
    "aarch64": {
        **dict.fromkeys((63, 65, 207, 212, 243), "read"),
        73: "poll",
        72: "select",
        **dict.fromkeys((22, 441), "epoll"),
    },
}.get(platform.machine(), {})
_POLLFD = struct.Struct("iHH")  # fd, events, revents
_POLLIN = 0x001  # also EPOLLIN
_MAX_FDS = 1024  # descriptors looked at in one wait

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


def _tcp_state(sock: socket.socket) -> int | None:
    """The connection's TCP state (tcpi_state), or None when it is not a TCP socket any more."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None


def was_cut(sock: socket.socket) -> bool:
    """After a read of end of file: whether it was our shutdown, the peer still being open."""
    return _tcp_state(sock) in _PEER_OPEN_STATES


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


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, sent but not acknowledged or not sent yet."""
    try:
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", out)[0]


def write_was_cut(sock: Any) -> bool:
    """After EPIPE on a send: whether it came from a shutdown on our side (the watchdog's)."""
    if not isinstance(sock, socket.socket):
        return False  # a datagram request: (data, socket)
    return _tcp_state(sock) in _WE_SHUT_STATES


# What the thread serving a connection is doing, for the watchdog (Task.waits_for):
READING = "reading"  # blocked waiting to read the connection (among others, maybe)
BUSY = "busy"  # running, or blocked on anything else: computing the client's reply
UNKNOWN = "unknown"  # /proc would not say (no permission, another architecture)


class Task:
    """The thread that serves a connection: process `pid`, thread `tid` (Linux ids)."""

    __slots__ = ("pid", "tid")

    def __init__(self, pid: int, tid: int) -> None:
        self.pid = pid
        self.tid = tid

    def waits_for(self, inode: int) -> str:
        """READING if the thread is blocked waiting to read the socket whose inode is `inode`
        (among others, in a poll, select or epoll)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.tid}/syscall", "rb") as f:
                fields = f.read().split()
        except OSError:
            return UNKNOWN
        if not fields or not fields[0].isdigit():
            return BUSY  # "running", or "-1" (not in a syscall at all)
        kind = _WAIT_CALLS.get(int(fields[0]))
        if kind is None:
            return BUSY if _WAIT_CALLS else UNKNOWN
        first, second = int(fields[1], 16), int(fields[2], 16)
        if kind == "read":
            fds: list[int] | None = [first]
        elif kind == "poll":
            fds = self._polled(first, second)
        elif kind == "select":
            fds = self._selected(first, second)
        else:
            fds = self._epolled(first)
        if fds is None:
            return UNKNOWN
        target = f"socket:[{inode}]"
        return READING if any(self._link(fd) == target for fd in fds) else BUSY

    def _link(self, fd: int) -> str | None:
        try:
            return os.readlink(f"/proc/{self.pid}/fd/{fd}")
        except OSError:
            return None

    def _memory(self, address: int, size: int) -> bytes | None:
        """`size` bytes of the process's memory at `address` (what a blocked call points to)."""
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.pread(fd, size, address)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _polled(self, address: int, count: int) -> list[int] | None:
        raw = self._memory(address, _POLLFD.size * min(count, _MAX_FDS))
        if raw is None:
            return None
        whole = len(raw) - len(raw) % _POLLFD.size  # a short read ends mid-entry
        entries = (_POLLFD.unpack_from(raw, at) for at in range(0, whole, _POLLFD.size))
        return [fd for fd, events, _ in entries if events & _POLLIN]

    def _selected(self, count: int, address: int) -> list[int] | None:
        if address == 0:
            return []  # no read set
        raw = self._memory(address, (min(count, _MAX_FDS) + 7) // 8)
        if raw is None:
            return None
        return [fd for fd in range(len(raw) * 8) if raw[fd // 8] >> (fd % 8) & 1]

    def _epolled(self, epfd: int) -> list[int] | None:
        # fdinfo of an epoll descriptor: one "tfd: FD events: MASK data: ..." line per entry.
        try:
            with open(f"/proc/{self.pid}/fdinfo/{epfd}", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        fds = []
        for line in lines[:_MAX_FDS]:
            words = line.split()
            if len(words) >= 4 and words[0] == b"tfd:" and int(words[3], 16) & _POLLIN:
                fds.append(int(words[1]))
        return fds


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
      turned into TimeoutError here; and a sendall() that has to wait at all finishes within
      `timeout` of its first wait.
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

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        try:
            sent = _send(self, view, flags | socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(view):
            self._send_rest(view[sent:], flags)
        self._deadline = time.monotonic() + self._timeout

    def _send_rest(self, view: memoryview, flags: int) -> None:
        """Send what did not fit at once, all of it within `timeout`: one SO_SNDTIMEO wait
        after another, each let through by a few bytes of window, would add up without end
        (and an inline server's wait holds the whole loop)."""
        deadline = time.monotonic() + self._timeout
        try:
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the client did not read the reply within {self._timeout}s")
                # Never 0 (a timeval of 0 means wait for ever).
                self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(max(left, 1e-3)))
                try:
                    view = view[_send(self, view, flags) :]
                except BlockingIOError:
                    raise TimeoutError("timed out") from None
        finally:
            self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self._timeout))


# A running request as the watchdog sees it: its socket, its client, when it started
# (time.monotonic()), and the thread serving it.
Running = tuple[socket.socket, Any, float, Task]


class Watchdog:
    """Cuts off a pool's TCP connections whose client has held them up for `timeout` seconds:
    sent nothing for that long, and not reading (data waits to go out) or being waited on (the
    handler is blocked reading it). See the module docstring.

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
        for sock, client_address, started, task in self._running():
            seen.add(sock)
            if sock in self._cut or now - started < self.timeout:
                continue
            reason = self._cut_off(sock, task)
            if reason is None:
                continue
            self._cut.add(sock)
            log.warning(
                "request_timeout",
                server=self.server_name,
                client=format_address(client_address),
                timeout=self.timeout,
                reason=reason,
            )
        self._cut &= seen
        if seen:
            self.arm()

    def _cut_off(self, sock: socket.socket, task: Task) -> str | None:
        """Shut `sock` if its client has held it up for `timeout`: why, or None if not."""
        with _FD_LOCK:  # the number stays this connection's while we look (see shut())
            if sock.fileno() < 0:
                return None
            quiet = quiet_seconds(sock)
            if quiet is None or quiet < self.timeout:
                return None
            if unsent_bytes(sock):
                how, reason = socket.SHUT_RDWR, "client stopped reading"
            elif task.waits_for(os.fstat(sock.fileno()).st_ino) != BUSY:
                how, reason = socket.SHUT_RD, "client too slow to send"
            else:
                return None  # the handler is still working on its reply
            try:
                sock.shutdown(how)
            except OSError:
                return None
        return reason
