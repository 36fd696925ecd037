"""Serving the configured servers: each one's listener, dispatcher and lifecycle in the loop.

ServingMixIn is the part of the Supervisor that starts, stops, pauses, changes and retires
servers; the Supervisor (supervisor.py) owns the loop, signals and shutdown, and mixes it in.

Lifecycle of a server (daemon.listeners.State): RUNNING <-> PAUSED, RUNNING -> DRAINING ->
STOPPED, or FAILED when its fork pool cannot keep workers alive. Stopping takes the connections
the kernel already accepted (a filter that drops new SYNs on TCP listeners, then the accept
queue drained), waits for the handshakes a TCP listener had half done (HANDSHAKE_GRACE at most),
then closes the listener; the pool finishes what it has before it retires.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from . import handshakes, upgrade
from . import log as logmod
from .config import Config, ServerConfig
from .errors import DaemonError
from .execpool import ExecDispatcher
from .forkpool import ForkPool
from .listeners import (
    Counters,
    Dispatcher,
    ManagedMixIn,
    Phase,
    State,
    attach_drop_syn_filter,
    build_server,
)
from .log import format_address, get_logger
from .threadpool import InlineDispatcher, ThreadPool
from .timers import Timer

log = get_logger()

# How many requests one readiness event may take from a listener before the loop looks at the
# other servers again: enough to amortise select() under load, small enough that a flood on one
# server cannot starve the others. Inline requests run in the loop, so they get a smaller share.
BATCH = {"inline": 4, "thread": 32, "fork": 32, "exec": 8}

# Ceiling on connections taken from a listener's accept queue when it stops.
BACKLOG_DRAIN_MAX = 65536

# inetd's loop guard for `wait` services: a program that fails this many times in a row, each
# within WAIT_LOOP_SECONDS, most likely leaves its datagram unread and is started again for it
# at once, for ever. The service then rests WAIT_LOOP_PAUSE seconds, and what waits is dropped.
WAIT_LOOP_LIMIT = 10
WAIT_LOOP_SECONDS = 1.0
WAIT_LOOP_PAUSE = 10.0

# How long a stopped TCP listener stays open, new SYNs dropped, for the clients whose handshake
# it had half done (SYN answered, ACK not in yet): their ACK is a round trip away, or behind
# the first SYN-ACK retransmission (after 1 s) if it was lost.
HANDSHAKE_GRACE = 1.5


class ServerUnit:
    """One configured server: its config, its listener and dispatcher while it has them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = config.name
        self.server: Any = None
        self.dispatcher: Dispatcher | None = None
        # Pools replaced by a reload or a stop, finishing their in-flight requests.
        self.retiring: list[Dispatcher] = []
        self.state = State.STOPPED
        self.registered = False
        self.removed = False
        self.stopped_by_operator = False
        self.address = str(config.listen)
        self.backoff_timer: Timer | None = None
        self.cps_timer: Timer | None = None
        # Stopped TCP listeners kept open until their half-done handshakes complete: the
        # server object, and when to close it at the latest (monotonic).
        self.closing: dict[Any, float] = {}
        # Counters outlive the listener: a stop and start, or a reload, keeps the figures.
        self.counters = Counters()
        self.wait_failures = 0  # fast failures in a row of a `wait` program (WAIT_LOOP_LIMIT)

    def busy(self) -> bool:
        return self.state is State.DRAINING or bool(self.retiring) or bool(self.closing)

    @property
    def wait_mode(self) -> bool:
        """A datagram exec service: the program reads the socket itself (inetd's `wait`)."""
        return self.config.concurrency == "exec" and self.config.socket_type == "dgram"


class ServingMixIn:
    """The servers' side of the Supervisor. See the module docstring.

    The Supervisor provides the loop plumbing (watch, unwatch, call_later, the PoolHost
    interface) and the attributes annotated here.
    """

    config: Config
    units: dict[str, ServerUnit]
    inherited: dict[str, socket.socket]
    phase: Phase
    _handing_off: bool
    _handshake_timer: Timer | None
    _wakeup: Any
    thread_cpu: int | None
    watch: Callable[..., None]
    unwatch: Callable[[int], None]
    call_later: Callable[[float, Callable[[], None]], Timer]
    _finish_shutdown: Callable[[], None]

    # -- servers -----------------------------------------------------------------------------

    def bind(self, name: str, config: ServerConfig) -> Any:
        """A listening server for `config`: on a socket passed to us (socket activation, or the
        daemon we take over from) when there is one for it, else freshly bound. DaemonError
        naming the server and its address when it cannot be had."""
        counters = self.units[name].counters if name in self.units else None
        inherited = self._inherited_for(name, config)
        try:
            return build_server(config, counters, inherited=inherited)
        except OSError as exc:
            raise DaemonError(
                f"cannot bind servers.{name} to {config.listen}: {exc.strerror or exc}"
            ) from exc
        except ValueError as exc:
            raise DaemonError(f"servers.{name}.listen: {exc}") from exc

    def _inherited_for(self, name: str, config: ServerConfig) -> socket.socket | None:
        listen = config.listen
        if listen.kind == "systemd":
            sock = self.inherited.pop(listen.name, None)  # type: ignore[attr-defined]
            if sock is None:
                known = ", ".join(sorted(self.inherited)) or "none"
                raise DaemonError(
                    f"servers.{name}.listen: no socket named {listen.name!r} was passed by "
                    f"systemd (LISTEN_FDNAMES: {known})"
                )
            return sock
        sock = self.inherited.get(upgrade.SERVER_PREFIX + name)
        if sock is None or not _same_address(sock, listen):
            return None  # the address changed since: bind afresh, the old one goes unused
        return self.inherited.pop(upgrade.SERVER_PREFIX + name)

    def start_unit(self, unit: ServerUnit, server: Any) -> None:
        """Serve `unit` on the bound `server`."""
        config = unit.config
        server.counters = unit.counters
        unit.server = server
        unit.address = format_address(server.server_address)
        unit.dispatcher = server.dispatcher = self._dispatcher(config, server)
        if isinstance(unit.dispatcher, ForkPool):
            unit.dispatcher.start()
        unit.state = State.RUNNING
        self._listen(unit)
        log.info(
            "server_started",
            server=unit.name,
            address=unit.address,
            socket_type=config.socket_type,
            concurrency=config.concurrency,
            workers=config.workers,
        )

    def _dispatcher(self, config: ServerConfig, server: ManagedMixIn) -> Dispatcher:
        if config.concurrency == "exec":
            return ExecDispatcher(server, self)
        if config.concurrency == "thread":
            return ThreadPool(
                server,
                config.workers,
                config.max_queue,
                self._wakeup.wake,
                self.call_later,
                self.thread_cpu,
            )
        if config.concurrency == "fork":
            return ForkPool(server, config.workers, config.max_queue, self)
        return InlineDispatcher(server)

    def _listen(self, unit: ServerUnit) -> None:
        if not unit.registered and unit.server is not None:
            batch = BATCH[unit.config.concurrency]
            self.watch(unit.server.fileno(), lambda: self._on_listener(unit, batch))
            unit.registered = True

    def _unlisten(self, unit: ServerUnit) -> None:
        if unit.registered:
            self.unwatch(unit.server.fileno())
            unit.registered = False
        if unit.backoff_timer is not None:
            unit.backoff_timer.cancel()
            unit.backoff_timer = None
        if unit.cps_timer is not None and unit.state is not State.RUNNING:
            unit.cps_timer.cancel()
            unit.cps_timer = None

    @staticmethod
    def _take(server: Any, batch: int) -> None:
        handle_ready = server.handle_ready
        for _ in range(batch):
            if not handle_ready():
                break

    def _on_listener(self, unit: ServerUnit, batch: int) -> None:
        server = unit.server
        if server is None:
            return  # closed by an earlier callback of the same select() round
        if unit.wait_mode:
            self._serve_waiting(unit, server)
            return
        handle_ready = server.handle_ready
        for _ in range(batch):
            if not unit.registered or not handle_ready():
                break
            if server.cps_tripped:  # a flag test per request: the call only when it is set
                self._over_cps(unit, server)
                return
        backoff = server.accept_backoff()
        if backoff:
            # Out of descriptors (or similar): leave the listener out of the selector for a
            # while instead of waking up for the same failing accept() over and over.
            self._unlisten(unit)
            unit.backoff_timer = self.call_later(backoff, lambda: self._end_backoff(unit, server))

    def _serve_waiting(self, unit: ServerUnit, server: Any) -> None:
        """inetd's `wait` for datagram exec services: the program gets the socket itself, and
        the listener stays out of the selector until it exits. The sender of the datagram that
        woke us passes the server's checks first (allow/deny, access_times, cps: the program
        would read it unchecked): one that does not has its datagram dropped, unanswered."""
        sock = server.socket
        try:
            _peeked, sender = sock.recvfrom(1, socket.MSG_PEEK)
        except OSError:
            return  # nothing there after all, or an error the next datagram will not have
        if not server.verify_request((b"", sock), sender):
            try:
                sock.recv(1)  # the whole datagram goes, however long
            except OSError:
                pass
            if server.cps_tripped:
                self._over_cps(unit, server)
            return
        self._unlisten(unit)
        server.counters.requests += 1

        def done(code: int, duration: float) -> None:
            if server.socket.fileno() >= 0:
                server.socket.setblocking(False)  # the program had it blocking (execpool.spawn)
            failed_fast = code != 0 and duration < WAIT_LOOP_SECONDS
            unit.wait_failures = unit.wait_failures + 1 if failed_fast else 0
            if unit.server is not server or unit.state is not State.RUNNING:
                return
            if unit.wait_failures >= WAIT_LOOP_LIMIT:
                unit.wait_failures = 0
                self._rest(unit, server, "looping", WAIT_LOOP_PAUSE, failures=WAIT_LOOP_LIMIT)
                return
            self._listen(unit)

        unit.dispatcher.serve_socket(server.socket, done)  # type: ignore[union-attr]

    def _over_cps(self, unit: ServerUnit, server: Any) -> None:
        """The request just taken went over `cps` (server.cps_tripped): more than cps[0]
        connections came in a second, so refuse everything for cps[1] seconds."""
        server.cps_tripped = False
        if unit.server is server and unit.cps_timer is None:
            limit, seconds = unit.config.cps  # type: ignore[misc]
            self._rest(unit, server, "cps", seconds, limit=limit)

    def _rest(self, unit: ServerUnit, server: Any, reason: str, seconds: float, **why: Any) -> None:
        """Out of the selector for `seconds` (service_disabled); then what waits is dropped and
        the listener listens again (_enable_after)."""
        self._unlisten(unit)
        unit.cps_timer = self.call_later(seconds, lambda: self._enable_after(unit, server, reason))
        log.warning("service_disabled", server=unit.name, reason=reason, seconds=seconds, **why)

    def _enable_after(self, unit: ServerUnit, server: Any, reason: str) -> None:
        """The end of a rest (`cps`, or a looping `wait` program): drop what waits, listen."""
        unit.cps_timer = None
        if unit.server is not server:
            return
        refused = _refuse_backlog(server)
        if refused:
            server.counters.refuse(reason, refused)
        if unit.state is State.RUNNING:
            self._listen(unit)
        log.warning("service_enabled", server=unit.name, refused_backlog=refused)

    def _end_backoff(self, unit: ServerUnit, server: Any) -> None:
        unit.backoff_timer = None
        if unit.server is server and unit.state is State.RUNNING:
            self._listen(unit)

    def _close_listener(self, unit: ServerUnit, linger: bool = True) -> None:
        """Take the last connections the kernel accepted for `unit`, then close the listener;
        with `linger`, a TCP listener first waits for the handshakes it had half done."""
        server = unit.server
        self._unlisten(unit)
        sock = server.socket
        if self._handing_off:
            # The successor serves this very socket: close only our descriptor, leave the
            # filter, the accept queue and the socket file alone.
            server.disown_path()
        elif sock.fileno() >= 0:
            tcp = sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX
            if tcp:
                try:
                    attach_drop_syn_filter(sock)
                except OSError as exc:  # pragma: no cover - no BPF: a narrower race remains
                    log.warning("drop_filter_failed", server=unit.name, error=str(exc))
            self._drain(unit, server)
            if tcp and linger and unit.config.concurrency != "exec":
                unit.server = None
                self._linger(unit, server)
                return
        server.server_close()
        unit.server = None

    @staticmethod
    def _drain(unit: ServerUnit, server: Any) -> None:
        """Serve what waits in the listener's accept queue."""
        taken = 0
        while not unit.wait_mode and taken < BACKLOG_DRAIN_MAX and server.handle_ready():
            taken += 1

    # A stopped TCP listener lingers (new SYNs dropped) while it has handshakes half done: each
    # that completes is accepted and served as it comes in, and once none is left, or after
    # HANDSHAKE_GRACE, the listener closes. One sock_diag query answers for every lingering
    # listener; it runs once the loop has done what it was doing (a shutdown stops every server
    # first), again whenever one of them accepts, and at the earliest deadline.

    def _linger(self, unit: ServerUnit, server: Any) -> None:
        unit.closing[server] = time.monotonic() + HANDSHAKE_GRACE
        self.watch(server.fileno(), lambda: self._on_lingering(unit, server))
        self._check_handshakes_soon()

    def _on_lingering(self, unit: ServerUnit, server: Any) -> None:
        if server in unit.closing:
            self._drain(unit, server)
            self._check_handshakes_soon()

    def _check_handshakes_soon(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._handshake_timer = self.call_later(0, self._check_handshakes)

    def _check_handshakes(self) -> None:
        self._handshake_timer = None
        lingering = [(u, server) for u in self.units.values() for server in u.closing]
        if not lingering:
            return
        try:
            pending = handshakes.half_done([server.socket for _, server in lingering])
        except OSError as exc:
            # Without the kernel's word there is nothing to wait for: close as before.
            log.warning("handshake_check_failed", error=str(exc))
            pending = [0] * len(lingering)
        now = time.monotonic()
        next_deadline = None
        for (unit, server), count in zip(lingering, pending, strict=True):
            deadline = unit.closing[server]
            if count and now < deadline:
                next_deadline = min(deadline, next_deadline or deadline)
                continue
            if count:
                log.warning("handshakes_abandoned", server=unit.name, count=count)
            self._end_linger(unit, server)
        if next_deadline is not None:
            self._handshake_timer = self.call_later(next_deadline - now, self._check_handshakes)

    def _end_linger(self, unit: ServerUnit, server: Any) -> None:
        del unit.closing[server]
        self.unwatch(server.fileno())
        self._drain(unit, server)
        server.server_close()

    def _end_lingering(self) -> None:
        """Close every lingering listener now (a forced shutdown, the daemon's exit)."""
        for unit in self.units.values():
            for server in list(unit.closing):
                self._end_linger(unit, server)

    def _retire(self, unit: ServerUnit, stopping: bool = True) -> None:
        """Close the unit's listener and let its pool finish what it has. `stopping` (a stop,
        a removal, the shutdown): the pools are drained too, which asks exec programs to end
        (SIGTERM); a reload that changes the server lets them run to their end."""
        if unit.server is not None:
            self._close_listener(unit)
        if unit.dispatcher is not None:
            unit.retiring.append(unit.dispatcher)
            unit.dispatcher = None
        if stopping:
            for dispatcher in unit.retiring:
                dispatcher.drain()

    def _busy(self) -> bool:
        return any(u.busy() for u in self.units.values())

    def _progress(self) -> None:
        """Move retiring pools on: idle pools are closed; a draining server whose pools are all
        closed is stopped (and forgotten, if a reload removed it)."""
        for unit in list(self.units.values()):
            for dispatcher in list(unit.retiring):
                # A lingering listener may still hand its pool a connection.
                if dispatcher.idle() and not unit.closing:
                    dispatcher.close()
                if dispatcher.closed():
                    unit.retiring.remove(dispatcher)
            if unit.state is State.DRAINING and not unit.retiring and not unit.closing:
                unit.state = State.STOPPED
                c = unit.counters
                log.info(
                    "server_stopped",
                    server=unit.name,
                    requests=c.requests,
                    errors=c.errors,
                    rejected=c.rejected,
                )
                if unit.removed:
                    del self.units[unit.name]
        if self.phase is Phase.STOPPING and not self._busy():
            self._finish_shutdown()

    # -- what the control socket can ask -----------------------------------------------------

    def unit(self, name: str) -> ServerUnit:
        unit = self.units.get(name)
        if unit is None or unit.removed:
            raise DaemonError(f"no server named {name!r}")
        return unit

    def start_server(self, name: str) -> None:
        unit = self.unit(name)
        if unit.state in (State.RUNNING, State.PAUSED):
            raise DaemonError(f"server {name!r} is already {unit.state.value}")
        if unit.state is State.DRAINING:
            raise DaemonError(f"server {name!r} is still draining; start it once it has stopped")
        self.start_unit(unit, self.bind(name, unit.config))
        unit.stopped_by_operator = False

    def stop_server(self, name: str) -> None:
        unit = self.unit(name)
        if unit.state not in (State.RUNNING, State.PAUSED):
            raise DaemonError(f"server {name!r} is not running (it is {unit.state.value})")
        unit.state = State.DRAINING
        unit.stopped_by_operator = True  # a reload that changes its config leaves it stopped
        self._retire(unit)
        log.info("server_draining", server=name)
        self._progress()

    def pause_server(self, name: str) -> None:
        unit = self.unit(name)
        if unit.state is not State.RUNNING:
            raise DaemonError(f"server {name!r} is not running (it is {unit.state.value})")
        self._unlisten(unit)
        unit.state = State.PAUSED
        log.info("server_paused", server=name)

    def resume_server(self, name: str) -> None:
        unit = self.unit(name)
        if unit.state is not State.PAUSED:
            raise DaemonError(f"server {name!r} is not paused (it is {unit.state.value})")
        unit.state = State.RUNNING
        self._listen(unit)
        log.info("server_resumed", server=name)

    # Reload's steps (daemon.reload decides which to take).

    def remove_unit(self, name: str) -> None:
        unit = self.units[name]
        unit.removed = True
        if unit.server is not None or unit.dispatcher is not None or unit.retiring:
            unit.state = State.DRAINING
            self._retire(unit)
            self._progress()
        else:
            del self.units[name]
        log.info("server_removed", server=name)

    def take_listener(self, donor: ServerUnit, config: ServerConfig) -> Any:
        """A server for `config` on `donor`'s listening socket, which the donor gives up."""
        self._unlisten(donor)
        previous = donor.server
        donor.server = None
        return build_server(config, None, adopt=previous)

    def add_unit(self, config: ServerConfig, server: Any) -> None:
        predecessor = self.units.get(config.name)
        unit = self.units[config.name] = ServerUnit(config)
        if predecessor is not None:
            # Removed and added back while it drains: the new unit inherits what is still
            # finishing (so it is closed and reaped) and the figures.
            unit.retiring = predecessor.retiring
            unit.closing = predecessor.closing
            if predecessor.dispatcher is not None:
                unit.retiring.append(predecessor.dispatcher)
            unit.counters = predecessor.counters
        if server is not None:
            self.start_unit(unit, server)
        log.info("server_added", server=config.name)

    def change_unit(self, name: str, config: ServerConfig, server: Any) -> None:
        """Give `name` its new settings; `server` is its new listener if it needed one."""
        unit = self.units[name]
        was_paused = unit.state is State.PAUSED
        unit.config = config
        if not config.enabled or unit.stopped_by_operator:
            if unit.state in (State.RUNNING, State.PAUSED):
                unit.state = State.DRAINING
                self._retire(unit)
            log.info("server_changed", server=name, running=False)
            return
        if server is None and unit.server is not None:
            # Same address: a new server object adopts the listening socket, which stays open
            # (and keeps its accept queue) throughout, so no connect is refused.
            server = build_server(config, unit.counters, adopt=unit.server)
            self._unlisten(unit)
            unit.server = None
        # The old pool finishes its requests; the old listener, if any, closes.
        self._retire(unit, stopping=False)
        if server is None:
            log.warning("server_changed", server=name, running=False)
            return
        self.start_unit(unit, server)
        if was_paused:
            self.pause_server(name)
        log.info("server_changed", server=name)

    def set_config(self, config: Config, live_daemon_keys: list[str]) -> None:
        self.config = config
        if {"log_format", "log_level"} & set(live_daemon_keys):
            logmod.configure(config.daemon.log_format, config.daemon.log_level)


def _same_address(sock: socket.socket, listen: Any) -> bool:
    """Whether `sock` is bound where `listen` says (port 0 matches any port)."""
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    if listen.kind == "unix":
        return isinstance(bound, (str, bytes)) and bound == listen.sockaddr()
    if not isinstance(bound, tuple) or sock.family != listen.family:
        return False
    return bound[0] == listen.host and listen.port in (0, bound[1])


def _refuse_backlog(server: Any) -> int:
    """Take and drop what waits on the listener: accepted and closed, or datagrams read."""
    sock = server.socket
    refused = 0
    while refused < BACKLOG_DRAIN_MAX:
        try:
            if sock.type == socket.SOCK_STREAM:
                conn, _address = sock.accept()
                conn.close()
            else:
                sock.recv(65536)
        except OSError:
            break
        refused += 1
    return refused
