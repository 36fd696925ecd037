"""The supervisor: one selectors loop that serves every configured server.

Everything the supervisor waits on is a file descriptor in one selector, and each key's data is
the callback to run when it is ready: the listeners (each server's non-blocking step from
servers/), the control socket and its connections, the signal wakeup socket, the pools' wakeup (a
thread pool going idle), and the fork workers' channels. select() blocks with no timeout but the
nearest real deadline (a respawn backoff, the shutdown timeout); nothing polls.

Lifecycle of a server (daemon.listeners.State): RUNNING <-> PAUSED, RUNNING -> DRAINING ->
STOPPED, or FAILED when its fork pool cannot keep workers alive. Lifecycle of the daemon (Phase):
STARTING -> RUNNING -> STOPPING -> STOPPED.

Graceful stop: stop taking connections (a drop-all filter on TCP listeners, then drain the kernel's
accept queue, then close, so nothing the kernel accepted is reset), let in-flight and queued
requests finish within shutdown_timeout, then force what is left.
"""

from __future__ import annotations

import enum
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from servers.wakeup import Wakeup

from . import log as logmod
from . import pidfile, privileges, systemd, upgrade
from .config import Config, ServerConfig
from .control import ControlServer
from .errors import DaemonError, ExitStatus
from .execpool import ExecDispatcher
from .forkpool import ForkPool
from .listeners import (
    Counters,
    Dispatcher,
    ManagedMixIn,
    State,
    attach_drop_all_filter,
    build_server,
)
from .log import format_address, get_logger
from .metrics_http import MetricsServer
from .signals import SignalWakeup
from .stats import ProcessSampler, metrics_text
from .threadpool import InlineDispatcher, ThreadPool
from .timers import Timer, Timers
from .worker import detach_inherited

log = get_logger()

# How many requests one readiness event may take from a listener before the loop looks at the
# other servers again: enough to amortise select() under load, small enough that a flood on one
# server cannot starve the others. Inline requests run in the loop, so they get a smaller share.
BATCH = {"inline": 4, "thread": 32, "fork": 32, "exec": 8}
CONTROL_BATCH = 8

# After force, how long to wait for handlers and workers to go before exiting anyway.
FORCE_GRACE = 3.0

# Ceiling on connections taken from a listener's accept queue when it stops.
BACKLOG_DRAIN_MAX = 65536


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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
        # Counters outlive the listener: a stop and start, or a reload, keeps the figures.
        self.counters = Counters()

    def busy(self) -> bool:
        return self.state is State.DRAINING or bool(self.retiring)

    @property
    def wait_mode(self) -> bool:
        """A datagram exec service: the program reads the socket itself (inetd's `wait`)."""
        return self.config.concurrency == "exec" and self.config.socket_type == "dgram"


class Supervisor:
    """Owns the loop, the servers, their pools and the control socket.

    Methods for the caller:

    - run() -> int: start every enabled server, serve until stopped, return the exit status.
      Raises DaemonError when startup fails (a listener that cannot be bound).
    - begin_shutdown(timeout=None): the graceful stop (what SIGTERM does).
    - start_server / stop_server / pause_server / resume_server(name), reload(): what the
      control socket's commands do; DaemonError carries the reason when they cannot.
    """

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.phase = Phase.STARTING
        self.started_at = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.units: dict[str, ServerUnit] = {}
        self.control: ControlServer | None = None
        self.notifier = systemd.Notifier()
        self.inherited: dict[str, socket.socket] = {}
        self._wrote_pidfile = False
        self._pending_upgrade: upgrade.PendingUpgrade | None = None
        self._handing_off = False
        self.metrics_server: MetricsServer | None = None
        self.sampler = ProcessSampler()
        self._wakeup = Wakeup()
        self._signals: SignalWakeup | None = None
        self._pids: dict[int, Callable[[int, int], None]] = {}
        self._signal_actions: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.begin_shutdown,
            signal.SIGINT: self._on_sigint,
            signal.SIGHUP: self._on_sighup,
            signal.SIGCHLD: self._reap,
            signal.SIGUSR2: self._on_sigusr2,
        }
        self._stop_timer: Timer | None = None
        self._completed_at_stop = 0
        self._forced = 0
        self._hard_deadline: Timer | None = None
        self.exit_status = ExitStatus.OK

    # -- running -----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
            self.loop()
        finally:
            self.close()
        return int(self.exit_status)

    def start(self) -> None:
        """Bind everything, drop privileges, start the pools, say READY.

        The order matters: listeners (ports below 1024 included), the control socket and the
        pidfile are set up as the user who started us; the switch to [daemon] user/group comes
        next, before any worker is forked, so no handler ever runs as root when a user is set.
        """
        daemon = self.config.daemon
        self._signals = SignalWakeup(self._signal_actions)
        self.watch(self._signals.fileno(), self._on_signals)
        self.watch(self._wakeup.fileno(), self._wakeup.drain)
        self.inherited = systemd.listen_fds()
        identity = privileges.resolve(daemon.user, daemon.group)
        if daemon.pidfile:
            pidfile.check(daemon.pidfile, upgrade.predecessor())
        # The control socket first: if another selectd already runs this config, that is the
        # error to report, not the ports it holds.
        self._start_control()
        bound: dict[str, Any] = {}
        for config in self.config.servers.values():
            self.units[config.name] = ServerUnit(config)
            if config.enabled:
                bound[config.name] = self.bind(config.name, config)
                self.units[config.name].server = bound[config.name]
        if daemon.pidfile:
            pidfile.write(daemon.pidfile)
            self._wrote_pidfile = True
        if identity is not None:
            self._hand_files_to(identity)
            privileges.drop(identity)
            log.info("privileges_dropped", user=identity.user, uid=identity.uid, gid=identity.gid)
        for name, server in bound.items():
            self.start_unit(self.units[name], server)
        for name, sock in self.inherited.items():
            log.warning("inherited_socket_unused", name=name)
            sock.close()
        self.inherited.clear()
        self.phase = Phase.RUNNING
        log.info(
            "daemon_ready",
            servers=sum(1 for u in self.units.values() if u.state is State.RUNNING),
            config=self.config.source,
            control_socket=daemon.control_socket,
        )
        self.notifier.ready(self.status_line())
        upgrade.report_ready()
        if self.notifier.watchdog_interval:
            self._watchdog()

    def _start_control(self) -> None:
        from .commands import command_table

        daemon = self.config.daemon
        try:
            self.control = ControlServer(
                daemon.control_socket,
                self,
                command_table(self),
                inherited=self.inherited.pop(upgrade.CONTROL_NAME, None),
            )
        except OSError as exc:
            raise DaemonError(
                f"cannot create control socket {daemon.control_socket}: {exc.strerror or exc}"
            ) from exc
        control = self.control
        self.watch(control.fileno(), lambda: self._take(control, CONTROL_BATCH))
        address = daemon.metrics_listen
        if address is None:
            return
        try:
            self.metrics_server = MetricsServer(
                address,
                self,
                lambda: metrics_text(self, self.sampler),
                lambda: self.phase is Phase.RUNNING,
                inherited=self.inherited.pop(upgrade.METRICS_NAME, None),
            )
        except OSError as exc:
            raise DaemonError(
                f"cannot bind daemon.metrics_listen to {address}: {exc.strerror or exc}"
            ) from exc
        metrics = self.metrics_server
        self.watch(metrics.fileno(), lambda: self._take(metrics, CONTROL_BATCH))

    def _hand_files_to(self, identity: privileges.Identity) -> None:
        """The control socket and pidfile must stay usable by the user we become."""
        paths = [self.config.daemon.control_socket]
        if self.config.daemon.pidfile:
            paths.append(self.config.daemon.pidfile)
        for path in paths:
            try:
                os.chown(path, identity.uid, identity.gid)
            except OSError as exc:
                log.warning("chown_failed", path=path, error=exc.strerror)

    def status_line(self) -> str:
        running = sum(1 for u in self.units.values() if u.state is State.RUNNING)
        requests = sum(u.counters.requests for u in self.units.values())
        return f"{running}/{len(self.units)} servers running, {requests} requests"

    def _watchdog(self) -> None:
        # Sent from the loop itself: a wedged loop stops the pings and systemd restarts us.
        self.notifier.watchdog()
        if self.phase is not Phase.STOPPED:
            self.call_later(self.notifier.watchdog_interval, self._watchdog)

    def loop(self) -> None:
        select = self.selector.select
        timers = self.timers
        while self.phase is not Phase.STOPPED:
            for key, _events in select(timers.timeout()):
                key.data()
            timers.run_due()
            if self.phase is Phase.STOPPING or self._busy():
                self._progress()

    def close(self) -> None:
        """Release everything the loop holds; idempotent."""
        for unit in self.units.values():
            if unit.server is not None:
                self._close_listener(unit)
            for dispatcher in [unit.dispatcher, *unit.retiring]:
                if dispatcher is not None:
                    dispatcher.force()
                    dispatcher.close()
            unit.dispatcher = None
            unit.retiring.clear()
        for side in (self.control, self.metrics_server):
            if side is not None:
                self.unwatch(side.fileno())
                side.server_close()
        self.control = self.metrics_server = None
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        if self._wrote_pidfile and self.config.daemon.pidfile:
            problem = pidfile.remove(self.config.daemon.pidfile)
            if problem:
                log.warning("pidfile_not_removed", path=self.config.daemon.pidfile, error=problem)
            self._wrote_pidfile = False
        for sock in self.inherited.values():
            sock.close()
        self.inherited.clear()
        self.notifier.close()
        self._wakeup.close()
        self.selector.close()

    # -- loop plumbing (also the PoolHost and ControlHost interfaces) ------------------------

    def watch(
        self, fd: int, callback: Callable[[], None], events: int = selectors.EVENT_READ
    ) -> None:
        self.selector.register(fd, events, callback)

    def rewatch(self, fd: int, events: int) -> None:
        key = self.selector.get_key(fd)
        self.selector.modify(fd, events, key.data)

    def unwatch(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.timers.call_later(delay, callback)

    def own_pid(self, pid: int, on_exit: Callable[[int, int], None]) -> None:
        self._pids[pid] = on_exit

    def pool_idle(self) -> None:
        self._wakeup.wake()

    def pool_failed(self, server: ManagedMixIn, reason: str) -> None:
        unit = self.units.get(server.name)
        if unit is None or unit.server is not server:
            return
        log.error("server_failed", server=unit.name, reason=reason)
        self._close_listener(unit)
        unit.state = State.FAILED

    def fork_child(self, keep: set[int], child_main: Callable[[], None]) -> int:
        """Fork; the child drops everything of the supervisor's but `keep` and runs child_main."""
        pid = os.fork()
        if pid:
            return pid
        try:
            if self._signals is not None:
                self._signals.close_in_child()
            detach_inherited(keep)
            # A fresh stream and fresh loggers: another thread may have held the old ones' locks
            # at the moment of the fork.
            stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            logmod.configure(self.config.daemon.log_format, self.config.daemon.log_level, stream)
            child_main()
        finally:
            os._exit(1)

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
        server.on_cps_exceeded = lambda: self._disable_for_cps(unit, server)
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
            return ThreadPool(server, config.workers, config.max_queue, self._wakeup.wake)
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
            # A limit (cps) may take the listener out of the selector half way through.
            if not unit.registered or not handle_ready():
                break
        backoff = server.accept_backoff()
        if backoff:
            # Out of descriptors (or similar): leave the listener out of the selector for a
            # while instead of waking up for the same failing accept() over and over.
            self._unlisten(unit)
            unit.backoff_timer = self.call_later(backoff, lambda: self._end_backoff(unit, server))

    def _serve_waiting(self, unit: ServerUnit, server: Any) -> None:
        """inetd's `wait` for datagram exec services: the program gets the socket itself, and
        the listener stays out of the selector until it exits."""
        self._unlisten(unit)
        server.counters.add(requests=1)

        def done() -> None:
            if unit.server is server and unit.state is State.RUNNING:
                self._listen(unit)

        unit.dispatcher.serve_socket(server.socket, done)  # type: ignore[union-attr]

    def _disable_for_cps(self, unit: ServerUnit, server: Any) -> None:
        """More than cps[0] connections in a second: refuse everything for cps[1] seconds."""
        if unit.server is not server or unit.cps_timer is not None:
            return
        limit, seconds = unit.config.cps  # type: ignore[misc]
        self._unlisten(unit)
        unit.cps_timer = self.call_later(seconds, lambda: self._enable_after_cps(unit, server))
        log.warning(
            "service_disabled", server=unit.name, reason="cps", limit=limit, seconds=seconds
        )

    def _enable_after_cps(self, unit: ServerUnit, server: Any) -> None:
        unit.cps_timer = None
        if unit.server is not server:
            return
        refused = _refuse_backlog(server)
        if refused:
            server.counters.refuse("cps", refused)
        if unit.state is State.RUNNING:
            self._listen(unit)
        log.warning("service_enabled", server=unit.name, refused_backlog=refused)

    def _end_backoff(self, unit: ServerUnit, server: Any) -> None:
        unit.backoff_timer = None
        if unit.server is server and unit.state is State.RUNNING:
            self._listen(unit)

    def _close_listener(self, unit: ServerUnit) -> None:
        """Take the last connections the kernel accepted for `unit`, then close the listener."""
        server = unit.server
        self._unlisten(unit)
        sock = server.socket
        if self._handing_off:
            # The successor serves this very socket: close only our descriptor, leave the
            # filter, the accept queue and the socket file alone.
            server.disown_path()
        elif sock.fileno() >= 0:
            if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
                try:
                    attach_drop_all_filter(sock)
                except OSError as exc:  # pragma: no cover - no BPF: a narrower race remains
                    log.warning("drop_filter_failed", server=unit.name, error=str(exc))
            taken = 0
            while not unit.wait_mode and taken < BACKLOG_DRAIN_MAX and server.handle_ready():
                taken += 1
        server.server_close()
        unit.server = None

    def _retire(self, unit: ServerUnit) -> None:
        """Close the unit's listener and let its pool finish what it has."""
        if unit.server is not None:
            self._close_listener(unit)
        if unit.dispatcher is not None:
            unit.dispatcher.drain()
            unit.retiring.append(unit.dispatcher)
            unit.dispatcher = None

    def _busy(self) -> bool:
        return any(u.busy() for u in self.units.values())

    def _progress(self) -> None:
        """Move retiring pools on: idle pools are closed; a draining server whose pools are all
        closed is stopped (and forgotten, if a reload removed it)."""
        for unit in list(self.units.values()):
            for dispatcher in list(unit.retiring):
                if dispatcher.idle():
                    dispatcher.close()
                if dispatcher.closed():
                    unit.retiring.remove(dispatcher)
            if unit.state is State.DRAINING and not unit.retiring:
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
        self._retire(unit)  # the old pool finishes its requests; the old listener, if any, closes
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

    # -- signals and shutdown ----------------------------------------------------------------

    def _on_signals(self) -> None:
        assert self._signals is not None
        for signum in self._signals.pending():
            action = self._signal_actions.get(signum)
            if action is not None:
                action()

    def _on_sigint(self) -> None:
        if self.phase is Phase.STOPPING:
            self.force_shutdown()  # a second Ctrl-C: stop waiting
        else:
            self.begin_shutdown()

    def _on_sigusr2(self) -> None:
        try:
            self.upgrade()
        except DaemonError as exc:
            log.error("upgrade_failed", reason=str(exc))

    def upgrade(self) -> int:
        """Start a successor with every listening socket; it takes over once ready. Its pid."""
        if self.phase is not Phase.RUNNING:
            raise DaemonError(f"cannot upgrade while {self.phase.value}")
        if self._pending_upgrade is not None:
            raise DaemonError(f"an upgrade is under way (new pid {self._pending_upgrade.pid})")
        sockets: list[tuple[str, socket.socket]] = []
        for unit in self.units.values():
            if unit.server is not None:
                listen = unit.config.listen
                if listen.kind == "systemd":
                    name = listen.name
                else:
                    name = upgrade.SERVER_PREFIX + unit.name
                sockets.append((name, unit.server.socket))
        if self.control is not None:
            sockets.append((upgrade.CONTROL_NAME, self.control.socket))
        if self.metrics_server is not None:
            sockets.append((upgrade.METRICS_NAME, self.metrics_server.socket))
        try:
            pid, ready_fd = upgrade.spawn_successor(sockets)
        except OSError as exc:
            raise DaemonError(f"cannot start the new process: {exc.strerror or exc}") from exc
        pending = upgrade.PendingUpgrade(
            pid, ready_fd, self.unwatch, self._upgrade_ready, self._upgrade_failed
        )
        self._pending_upgrade = pending
        self.watch(ready_fd, pending.readable)
        self.own_pid(pid, lambda _pid, status: pending.exited(status))
        self.call_later(upgrade.READY_TIMEOUT, pending.timed_out)
        log.info("upgrade_begun", new_pid=pid)
        return pid

    def _upgrade_ready(self, pid: int) -> None:
        log.info("upgrade_ready", new_pid=pid)
        self.notifier.mainpid(pid)
        # The successor is a child of ours only by accident of fork: once we exit it belongs to
        # init (or systemd); we must not wait for it, nor reap it as a worker.
        self._pids.pop(pid, None)
        self._pending_upgrade = None
        self._handing_off = True
        if self.control is not None:
            self.control.disown_path()
        if self.metrics_server is not None:
            self.unwatch(self.metrics_server.fileno())
            self.metrics_server.server_close()
            self.metrics_server = None
        self.begin_shutdown()

    def _upgrade_failed(self, reason: str) -> None:
        log.error("upgrade_failed", reason=reason)
        self._pending_upgrade = None

    def _on_sighup(self) -> None:
        from .commands import reload_from_file

        try:
            result = reload_from_file(self)
        except DaemonError as exc:
            log.error("reload_failed", error=str(exc))
        else:
            log.info("reload_done", **result)

    def _reap(self) -> None:
        """Reap every exited child: waitpid(-1, WNOHANG) until none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            on_exit = self._pids.pop(pid, None)
            if on_exit is not None:
                on_exit(pid, status)

    def _completed(self) -> int:
        return sum(unit.counters.completed for unit in self.units.values())

    def begin_shutdown(self, timeout: float | None = None) -> None:
        if self.phase is not Phase.RUNNING:
            return
        timeout = self.config.daemon.shutdown_timeout if timeout is None else timeout
        self.phase = Phase.STOPPING
        in_flight = sum(
            d.active() + d.queued()
            for u in self.units.values()
            for d in [u.dispatcher, *u.retiring]
            if d is not None
        )
        log.info("shutdown_begun", timeout=timeout, in_flight=in_flight)
        if not self._handing_off:
            self.notifier.stopping(f"stopping: {in_flight} requests in flight")
        self._completed_at_stop = self._completed()
        if self._handing_off and self.control is not None:
            # The successor answers on the control socket from now on.
            self.unwatch(self.control.fileno())
            self.control.server_close()
            self.control = None
        for unit in self.units.values():
            if unit.state in (State.RUNNING, State.PAUSED, State.DRAINING):
                unit.state = State.DRAINING
                self._retire(unit)
        self._stop_timer = self.call_later(timeout, self.force_shutdown)
        self._progress()

    def force_shutdown(self) -> None:
        if self.phase is not Phase.STOPPING or self._hard_deadline is not None:
            return
        forced = 0
        for unit in self.units.values():
            for dispatcher in unit.retiring:
                forced += dispatcher.force()
        self._forced += forced
        log.warning("shutdown_forcing", forced=forced)
        self._hard_deadline = self.call_later(FORCE_GRACE, self._give_up)
        self._progress()

    def _give_up(self) -> None:
        stuck = [u.name for u in self.units.values() if u.busy()]
        log.error("shutdown_stuck", servers=stuck)
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self.phase is Phase.STOPPED:
            return
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        if self._hard_deadline is not None:
            self._hard_deadline.cancel()
        drained = max(0, self._completed() - self._completed_at_stop - self._forced)
        log.info("shutdown_complete", drained=drained, forced=self._forced)
        if self._forced:
            self.exit_status = ExitStatus.RUNTIME
        self.phase = Phase.STOPPED


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
