"""selectd's servers: the `servers` transports plus access control, timeouts, counters and dispatch.

A ManagedServer is an ordinary socketserver-style server (a handler sees it as `self.server`, with
`self.server.options` from the config). What it adds sits in the stdlib's own hooks:

- verify_request: the allow/deny CIDR lists.
- process_request: hand the request to the server's dispatcher (inline, thread pool, fork pool);
  a full dispatcher means the request is rejected, closed at once and counted.
- handle_error: one structured `request_failed` event, and the error count.
- run_request: finish_request with the error handling every dispatcher shares.

How `timeout` is enforced (SO_SNDTIMEO, the loop's watchdog, and SO_RCVTIMEO where no watchdog
can run, never settimeout(), which turns every recv into poll()+recv) is daemon/connections.py's.
On TCP the socket options are set once on the listener, and every accepted socket inherits them.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import errno
import ipaddress
import os
import socket
import stat
import struct
import sys
import threading
from typing import Any, Protocol

import servers
from servers.ratelimit import RateLimiter

from .config import ServerConfig
from .connections import (
    Connection,
    IOTimeoutSocket,
    RequestCut,
    is_timeout,
    set_io_timeout,
    write_was_cut,
)
from .limits import RequestLimits
from .log import format_address, get_logger

log = get_logger()

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Phase(enum.Enum):
    """The daemon's lifecycle."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Dispatcher(Protocol):
    """How a server runs its requests: inline, in a thread pool, or in a fork pool."""

    def submit(self, request: Any, client_address: Any) -> bool: ...
    def active(self) -> int: ...
    def queued(self) -> int: ...
    def idle(self) -> bool: ...
    def drain(self) -> None: ...
    def force(self) -> int: ...
    def close(self) -> None: ...
    def closed(self) -> bool: ...


# Upper bounds (seconds) of the request duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counters:
    """A server's request figures. requests, denied and rejected have one writer, the loop's
    thread; what finishing requests updates (thread-pool workers among them) takes the lock.

    They belong to the configured server, not to one listener: they survive stop/start and
    reloads.
    """

    __slots__ = (
        "buckets",
        "completed",
        "denied",
        "duration_sum",
        "errors",
        "lock",
        "refused",
        "rejected",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0  # taken and dispatched (after verify_request)
        self.completed = 0  # finished, with or without error
        self.errors = 0  # handler raised, or a fork worker died mid-request
        self.denied = 0  # refused by allow/deny
        self.rejected = 0  # no room in the pool's queue
        self.refused: dict[str, int] = {}  # by limit: instances, per_source, cps, access_times
        self.duration_sum = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative
        self.lock = threading.Lock()

    def refuse(self, reason: str, count: int = 1) -> None:
        with self.lock:
            self.refused[reason] = self.refused.get(reason, 0) + count

    def finished(self, seconds: float, failed: bool) -> None:
        """Account one request that ran for `seconds` and ended well or not."""
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self.lock:
            self.completed += 1
            if failed:
                self.errors += 1
            self.duration_sum += seconds
            self.buckets[index] += 1


class Acl:
    """allow/deny CIDR lists: deny wins; an empty allow list admits everyone."""

    def __init__(self, allow: tuple[Any, ...], deny: tuple[Any, ...]) -> None:
        self.allow = allow
        self.deny = deny
        self.open = not allow and not deny

    def admits(self, client_address: Any) -> bool:
        if self.open:
            return True
        if not isinstance(client_address, tuple):
            return True  # unix peers have no address to check; config forbids ACLs there
        try:
            ip = ipaddress.ip_address(client_address[0].split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 is 10.1.2.3 as far as the rules go
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)


# Classic BPF, as a TCP listener's socket filter sees a segment: from its TCP header on.
BPF_LDB_ABS = 0x30  # A = the byte at offset k
BPF_AND_K = 0x54  # A &= k
BPF_JEQ_K = 0x15  # A == k ? skip jt : skip jf
BPF_RET_K = 0x06  # keep k bytes of the packet: 0 drops it
TCP_FLAGS_OFFSET = 13
TCP_SYN, TCP_ACK = 0x02, 0x10
BpfProgram = tuple[tuple[int, int, int, int], ...]  # (code, jt, jf, k) per instruction

DROP_NEW_SYNS: BpfProgram = (
    (BPF_LDB_ABS, 0, 0, TCP_FLAGS_OFFSET),
    (BPF_AND_K, 0, 0, TCP_SYN | TCP_ACK),
    (BPF_JEQ_K, 0, 1, TCP_SYN),
    (BPF_RET_K, 0, 0, 0),
    (BPF_RET_K, 0, 0, 0xFFFFFFFF),
)


def attach_socket_filter(sock: socket.socket, program: BpfProgram) -> None:
    """Attach a classic BPF `program` to `sock` (SO_ATTACH_FILTER), replacing any filter."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    prog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def attach_drop_syn_filter(sock: socket.socket) -> None:
    """Make a TCP listener drop every new SYN, so no new client starts a handshake.

    Used before the last drain of the accept queue on stop: connections already queued are
    served, and a client arriving after that sees its SYN unanswered, then refused once the
    listener closes, instead of being accepted by the kernel and reset by the close.

    Only SYNs: a client whose SYN was answered before the filter went on sends the ACK that
    completes its handshake through it, and the drain takes that connection. A filter that
    dropped everything would drop that ACK too: the client, connected on its side, would send
    its request and be reset when the listener closed.
    """
    attach_socket_filter(sock, DROP_NEW_SYNS)


class ManagedMixIn:
    """selectd's policy for a `servers` transport. See the module docstring.

    Instance variables:

    - config: the ServerConfig this server was built from
    - name: the server's name in the config
    - options: the config's free-form [servers.NAME.options] table, read-only
    - counters: Counters
    - dispatcher: the Dispatcher running its requests (set after construction)
    """

    config: ServerConfig
    dispatcher: Dispatcher
    socket: socket.socket
    address_family: int
    socket_type: int
    server_address: Any
    allow_reuse_address: bool
    allow_reuse_port: bool
    request_queue_size: int

    def __init__(
        self,
        config: ServerConfig,
        counters: Counters | None = None,
        bind_and_activate: bool = True,
    ) -> None:
        # A socket passed by systemd has its family only at run time: AF_UNIX stands in until
        # adopt_inherited() takes the real one from the socket.
        self.address_family = config.listen.family or socket.AF_UNIX
        self.allow_reuse_address = config.allow_reuse_address
        self.allow_reuse_port = config.allow_reuse_port
        self.request_queue_size = config.request_queue_size
        self.config = config
        self.name = config.name
        self.options = config.options
        self.counters = counters if counters is not None else Counters()
        self.acl = Acl(config.allow, config.deny)
        # Set when a connection goes over `cps`: the loop that took it disables the listener.
        # A flag and not a callback into the supervisor: a handler's self.server must hold no
        # way back to it (README, "Guarantees").
        self.cps_tripped = False
        self.limits = RequestLimits(config, self._trip_cps)
        self._banner = config.banner_fail.encode() if config.banner_fail else b""
        self._deny_log = RateLimiter()
        self._reject_log = RateLimiter()
        self._refuse_log = RateLimiter()
        self._io_timeout = config.timeout if self.socket_type == socket.SOCK_STREAM else 0
        # Unix stream sockets do not inherit the listener's timeouts, TCP sockets do.
        self._per_connection_timeout = bool(self._io_timeout) and (
            self.address_family == socket.AF_UNIX
        )
        handler = config.handler_class() if config.command is None else servers.BaseRequestHandler
        address = "" if config.listen.kind == "systemd" else config.listen.sockaddr()
        super().__init__(address, handler, bind_and_activate)  # type: ignore[call-arg]

    def server_activate(self) -> None:
        super().server_activate()  # type: ignore[misc]
        self._set_listener_timeout()

    def _set_listener_timeout(self) -> None:
        # TCP connections inherit SO_RCVTIMEO/SO_SNDTIMEO from their listener: set once here.
        if self.socket_type == socket.SOCK_STREAM and self.address_family != socket.AF_UNIX:
            # A watched server's connections wait for the client without a timer of their own:
            # the watchdog sees a silent client as it sees a trickling one.
            set_io_timeout(self.socket, self._io_timeout, recv=not self.watched())

    def adopt(self, previous: ManagedMixIn) -> None:
        """Take over `previous`'s bound, listening socket (a reload that kept the address).

        The socket stays open and keeps its accept queue; only the policy around it is new.
        """
        self.adopt_socket(previous.socket)  # type: ignore[attr-defined]
        previous.disown_path()  # type: ignore[attr-defined]
        self._set_listener_timeout()
        if self.socket_type == socket.SOCK_STREAM:
            # A new backlog applies to a listening socket by listening again.
            self.socket.listen(self.request_queue_size)
        for option, on in (
            (socket.SO_REUSEADDR, self.allow_reuse_address),
            (socket.SO_REUSEPORT, self.allow_reuse_port),
        ):
            self.socket.setsockopt(socket.SOL_SOCKET, option, int(on))

    def adopt_inherited(self, sock: socket.socket) -> None:
        """Serve a socket passed by systemd or by the daemon this one took over from; ValueError
        saying why when it does not fit the server's config."""
        if sock.type != self.socket_type:
            kind = "stream" if sock.type == socket.SOCK_STREAM else "datagram"
            raise ValueError(
                f"the passed socket is a {kind} socket, the server's socket_type is "
                f"{self.config.socket_type!r}"
            )
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise ValueError(f"the passed socket's family {sock.family!r} is not served")
        if sock.family == socket.AF_UNIX and (
            self.config.allow or self.config.deny or self.config.per_source
        ):
            raise ValueError(
                "the passed socket is a unix socket: allow, deny and per_source need IP"
            )
        if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError("the passed stream socket is not listening")
        self.adopt_socket(sock)  # type: ignore[attr-defined]
        self._per_connection_timeout = bool(self._io_timeout) and (
            self.address_family == socket.AF_UNIX
        )
        self._set_listener_timeout()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            _remove_stale_unix_socket(self.server_address)
        super().server_bind()  # type: ignore[misc]

    def watched(self) -> bool:
        """Whether a watchdog in the loop enforces the request deadline (daemon/connections.py):
        TCP served by a pool. Elsewhere each connection enforces it itself."""
        return (
            bool(self._io_timeout)
            and self.address_family != socket.AF_UNIX
            and self.config.concurrency in ("thread", "fork")
        )

    def _trip_cps(self) -> None:
        self.cps_tripped = True

    def connection(self, fd: int) -> socket.socket:
        """The socket object for a connection's descriptor (accepted here or handed over)."""
        if not self._io_timeout:
            return socket.socket(self.address_family, self.socket_type, 0, fileno=fd)
        if self.watched():
            return Connection(self.address_family, self.socket_type, 0, fileno=fd)
        sock = IOTimeoutSocket(self.address_family, self.socket_type, 0, fileno=fd)
        sock.start_clock(self._io_timeout)
        return sock

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.acl.admits(client_address):
            self.counters.denied += 1
            suppressed = self._deny_log.allow()
            if suppressed is not None:
                log.warning(
                    "request_denied",
                    server=self.name,
                    client=format_address(client_address),
                    suppressed=suppressed,
                )
            self._send_banner(request)
            return False
        if not self.limits.active:
            return True
        reason = self.limits.refusal(client_address, self._in_use)
        if reason is None:
            return True
        self.counters.refuse(reason)
        suppressed = self._refuse_log.allow()
        if suppressed is not None:
            log.warning(
                "request_refused",
                server=self.name,
                client=format_address(client_address),
                reason=reason,
                suppressed=suppressed,
            )
        self._send_banner(request)
        return False

    def _in_use(self) -> int:
        return self.dispatcher.active() + self.dispatcher.queued()

    def _send_banner(self, request: Any) -> None:
        if self._banner and isinstance(request, socket.socket):
            try:
                request.send(self._banner, socket.MSG_DONTWAIT)
            except OSError:
                pass  # a refused client that cannot take the banner still gets the close

    def request_finished(self, client_address: Any) -> None:
        """A dispatcher's word that a request it took is over (per_source bookkeeping)."""
        if self.limits.per_source is not None:
            self.limits.finished(client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._per_connection_timeout:
            set_io_timeout(request, self._io_timeout)
        self.limits.started(client_address)
        try:
            taken = self.dispatcher.submit(request, client_address)
        except BaseException:  # a program that could not be started, say: not a slot held
            self.limits.finished(client_address)
            raise
        if taken:
            # Only the loop's thread counts requests (and denials, rejections): no lock needed.
            self.counters.requests += 1
            return
        self.limits.finished(client_address)
        self.counters.rejected += 1
        suppressed = self._reject_log.allow()
        if suppressed is not None:
            log.warning(
                "request_rejected",
                server=self.name,
                client=format_address(client_address),
                reason="queue full",
                max_queue=self.config.max_queue,
                suppressed=suppressed,
            )
        self.shutdown_request(request)  # type: ignore[attr-defined]

    def run_request(self, request: Any, client_address: Any) -> bool:
        """Run the handler for one request and close it; False when the handler failed.

        Accounting is the dispatcher's: it knows how long the request took (for a fork worker,
        only the supervisor can tell).

        A handler's SystemExit is a failed request like any other: it must not end a worker
        thread, a fork worker's loop or, for inline servers, the daemon.
        """
        ok = True
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except BaseException:
            ok = False
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]
        return ok

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, RequestCut) or (
            isinstance(exc, BrokenPipeError) and write_was_cut(request)
        ):
            return  # the watchdog that cut it off has said so
        if is_timeout(exc):
            # A client that stalls past `timeout` is not a bug in the handler: no traceback.
            log.warning(
                "request_timeout",
                server=self.name,
                client=format_address(client_address),
                timeout=self.config.timeout,
            )
            return
        log.error(
            "request_failed",
            server=self.name,
            client=format_address(client_address),
            exc_type=type(exc).__name__,
            exc_message=str(exc),
            exc_info=True,
        )


def probe_unix_path(path: str, kind: int = socket.SOCK_STREAM) -> str:
    """What is at a Unix socket path, by connecting to it as `kind`:

    "absent"; "not a socket" (a file, a directory: never to be touched); "stale" (a socket
    nobody listens on: left by a process that died, safe to remove); "live" (someone answers);
    "other kind" (a socket of the other type); or "error: ..." for anything else.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return "not a socket"
    except FileNotFoundError:
        return "absent"
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(2)  # a live listener with a full backlog must not hang us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        if exc.errno in (errno.EPROTOTYPE, errno.ENOTSOCK):
            return "other kind"
        return f"error: {exc.strerror or exc}"
    finally:
        probe.close()
    return "live"


def _remove_stale_unix_socket(path: Any) -> None:
    """Remove a socket file left by a dead process. A live socket is left for bind() to refuse,
    and anything that is not a socket is never touched."""
    if not isinstance(path, str) or not path or path.startswith("\0"):
        return
    state = probe_unix_path(path, socket.SOCK_STREAM)
    if state == "other kind":
        state = probe_unix_path(path, socket.SOCK_DGRAM)
    if state == "stale":
        os.unlink(path)  # nobody listens there any more


class ManagedStreamServer(ManagedMixIn, servers.TCPServer):
    """TCP (IPv4/IPv6) or Unix stream: the family follows the address."""

    def get_request(self) -> tuple[socket.socket, Any]:
        # socket.accept() with our connection class (see daemon/connections.py).
        fd, client_address = self.socket._accept()  # type: ignore[attr-defined]
        return self.connection(fd), client_address


class ManagedDatagramServer(ManagedMixIn, servers.UDPServer):
    """UDP (IPv4/IPv6) or Unix datagram: the family follows the address."""


def build_server(
    config: ServerConfig,
    counters: Counters | None = None,
    adopt: ManagedMixIn | None = None,
    inherited: socket.socket | None = None,
) -> ManagedStreamServer | ManagedDatagramServer:
    """The server for `config`: bound and listening, or on `adopt`'s socket, or on an
    `inherited` one; OSError if it cannot bind, ValueError if the inherited socket does not fit."""
    cls = ManagedStreamServer if config.socket_type == "stream" else ManagedDatagramServer
    fresh = adopt is None and inherited is None
    server = cls(config, counters, bind_and_activate=fresh)
    if adopt is not None:
        server.adopt(adopt)
    elif inherited is not None:
        try:
            server.adopt_inherited(inherited)
        except BaseException:
            server.socket.close()
            raise
    return server
