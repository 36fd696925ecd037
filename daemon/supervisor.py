"""The supervisor: one selectors loop that serves every configured server.

Everything the supervisor waits on is a file descriptor in one selector, and each key's data is
the callback to run when it is ready: the listeners (each server's non-blocking step from
servers/), the control socket and its connections, the signal wakeup socket, the pools' wakeup (a
thread pool going idle), and the fork workers' channels. select() blocks with no timeout but the
nearest real deadline (a respawn backoff, the shutdown timeout); nothing polls.

Lifecycle of a server (daemon.listeners.State): RUNNING <-> PAUSED, RUNNING -> DRAINING ->
STOPPED, or FAILED when its fork pool cannot keep workers alive. Lifecycle of the daemon (Phase):
STARTING -> RUNNING -> STOPPING -> STOPPED.

Graceful stop: stop taking connections (a filter that drops new SYNs on TCP listeners, then
drain the kernel's accept queue, then close, so nothing the kernel accepted is reset), let
in-flight and queued requests finish within shutdown_timeout, then force what is left.
"""

from __future__ import annotations

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
from .config import Config
from .control import ControlServer
from .errors import DaemonError, ExitStatus
from .listeners import (
    ManagedMixIn,
    Phase,
    State,
)
from .log import get_logger
from .metrics_http import MetricsServer
from .signals import SignalWakeup
from .stats import ProcessSampler, metrics_text
from .timers import Timer, Timers
from .units import ServerUnit, ServingMixIn
from .upgrade import UpgradeMixIn
from .worker import detach_inherited

log = get_logger()

# Connections the control and metrics listeners take per readiness event (units.BATCH has the
# servers' shares).
CONTROL_BATCH = 8

# After force, how long to wait for handlers and workers to go before exiting anyway.
FORCE_GRACE = 3.0


class Supervisor(ServingMixIn, UpgradeMixIn):
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
        # One descriptor held in reserve for the control socket when the process runs out.
        self._spare_fd: int | None = None
        self._reserve_spare_fd()
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
        self._handshake_timer: Timer | None = None
        self._hard_deadline: Timer | None = None
        self.exit_status = ExitStatus.OK
        # Fixed for the daemon's life: a reload that changes it says a restart is needed.
        self.thread_cpu = config.daemon.thread_cpu

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
        _check_thread_cpu(daemon.thread_cpu)
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
        self.watch(control.fileno(), lambda: self._on_side_listener(control))
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
        self.watch(metrics.fileno(), lambda: self._on_side_listener(metrics))

    def _on_side_listener(self, server: Any) -> None:
        """The control or metrics listener is readable: take its connections; out of
        descriptors, back off as the servers do, but first spend the spare descriptor kept for
        this, so that an operator can still ask the daemon what is going on."""
        self._take(server, CONTROL_BATCH)
        backoff = server.accept_backoff()
        if not backoff:
            return
        if server is self.control and self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            server.handle_ready()
        self.unwatch(server.fileno())

        def resume() -> None:
            if server.socket.fileno() >= 0 and server in (self.control, self.metrics_server):
                self.watch(server.fileno(), lambda: self._on_side_listener(server))
            self._reserve_spare_fd()

        self.call_later(backoff, resume)

    def _reserve_spare_fd(self) -> None:
        if self._spare_fd is None:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # still out of descriptors: the next backoff tries again

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
        self._end_lingering()
        for unit in self.units.values():
            if unit.server is not None:
                self._close_listener(unit, linger=False)
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
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
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
        self._close_listener(unit, linger=False)
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
            # Fresh stdio and loggers: another thread may have held the old ones' locks at the
            # moment of the fork.
            stream = logmod.fresh_stdio()
            logmod.configure(self.config.daemon.log_format, self.config.daemon.log_level, stream)
            child_main()
        finally:
            os._exit(1)

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

    def _on_sighup(self) -> None:
        from .commands import reload_from_file

        try:
            reload_from_file(self)
        except DaemonError:
            pass  # logged (reload_failed) and nothing changed

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
        self._end_lingering()
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


def _check_thread_cpu(cpu: int | None) -> None:
    """DaemonError unless `cpu` (daemon.thread_cpu) is one this process may run on."""
    if cpu is None:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise DaemonError(
            f"daemon.thread_cpu: CPU {cpu} is not one selectd may run on "
            f"(allowed: {', '.join(map(str, allowed))})",
            ExitStatus.USAGE,
        )
