"""Reload: apply a new config to the running daemon, touching only what changed.

The new file is validated completely before anything happens; an invalid one changes nothing.
Then the two configs are compared server by server (ServerConfig equality is field by field):

- unchanged: untouched. Its listener is never closed, its open connections carry on.
- removed: drained and closed, like `stop`.
- added: bound and served.
- changed: takes the new settings for new requests. When `listen` and `socket_type` are the
  same the listening socket is kept (no connect is refused); the pool is replaced, and the old
  one finishes its in-flight requests before it retires. When the address changed, the new one
  is bound first and the old one drained.

Everything that needs a new socket is bound before anything else changes, so a reload that
cannot bind (a port in use) is refused whole, with nothing changed.

[daemon] settings: log_level, log_format and shutdown_timeout apply at once; control_socket,
pidfile, user and group need a restart, and the reply says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Config, ServerConfig

if TYPE_CHECKING:
    from .supervisor import Supervisor

LIVE_DAEMON_KEYS = ("log_format", "log_level", "shutdown_timeout")


@dataclass
class ReloadPlan:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    daemon_applied: list[str] = field(default_factory=list)
    daemon_needs_restart: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    plan = ReloadPlan()
    for name, config in new.servers.items():
        if name not in old.servers:
            plan.added.append(name)
        elif old.servers[name] == config:
            plan.unchanged.append(name)
        else:
            plan.changed.append(name)
    plan.removed = [name for name in old.servers if name not in new.servers]
    for f in dataclasses.fields(old.daemon):
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name):
            if f.name in LIVE_DAEMON_KEYS:
                plan.daemon_applied.append(f.name)
            else:
                plan.daemon_needs_restart.append(f.name)
    return plan


def same_socket(old: ServerConfig, new: ServerConfig) -> bool:
    """Whether `new` can keep the listening socket `old` has (the backlog and the reuse flags
    are applied to the socket as it is)."""
    return old.listen == new.listen and old.socket_type == new.socket_type


def _address(config: ServerConfig) -> tuple[Any, str]:
    return (config.listen, config.socket_type)


def apply_reload(supervisor: Supervisor, new: Config) -> dict[str, Any]:
    """Move `supervisor` to `new`; raises DaemonError (nothing changed) when a bind fails."""
    plan = plan_reload(supervisor.config, new)
    units = supervisor.units
    # Listening sockets this reload frees (removed servers, servers that move) can go to a
    # server that wants the same address: a rename, or two servers trading places, keeps the
    # socket and its accept queue, and binds nothing.
    donors: dict[tuple[Any, str], Any] = {}
    for name in plan.removed + plan.changed:
        unit = units[name]
        moved = name in plan.removed or not same_socket(unit.config, new.servers[name])
        if unit.server is not None and moved:
            donors[_address(unit.config)] = unit
    wanted: list[str] = []
    for name in plan.added + plan.changed:
        config = new.servers[name]
        unit = units.get(name)
        if not config.enabled or (unit is not None and unit.stopped_by_operator):
            continue
        if unit is not None and unit.server is not None and same_socket(unit.config, config):
            continue  # keeps its own socket
        wanted.append(name)
    # Phase 1: every new socket, or none.
    fresh: dict[str, Any] = {}
    try:
        for name in wanted:
            if _address(new.servers[name]) not in donors:
                fresh[name] = supervisor.bind(name, new.servers[name])
    except BaseException:
        for server in fresh.values():
            server.server_close()
        raise
    # Phase 2: nothing below can fail for lack of a socket.
    for name in wanted:
        donor = donors.pop(_address(new.servers[name]), None)
        if name not in fresh and donor is not None:
            fresh[name] = supervisor.take_listener(donor, new.servers[name])
    for name in plan.removed:
        supervisor.remove_unit(name)
    for name in plan.added:
        supervisor.add_unit(new.servers[name], fresh.get(name))
    for name in plan.changed:
        supervisor.change_unit(name, new.servers[name], fresh.get(name))
    # The running config: the new servers and live keys; the keys that need a restart keep the
    # values the daemon runs with (its pidfile, control socket, user), so that what it cleans
    # up at exit and what the next reload compares against are what is in force.
    live = {key: getattr(new.daemon, key) for key in LIVE_DAEMON_KEYS}
    running = dataclasses.replace(new, daemon=dataclasses.replace(supervisor.config.daemon, **live))
    supervisor.set_config(running, plan.daemon_applied)
    return plan.summary()
