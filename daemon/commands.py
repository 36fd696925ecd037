"""The control socket's commands: an explicit table from name to function.

Each command takes the request object and returns a JSON-able result, or raises CommandError
with the message for the error reply. Arguments are checked here, so that a request with a
missing or mistyped argument gets a clear error and the supervisor never sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ConfigError, dump_config, load_config
from .control import Command, CommandError
from .errors import DaemonError
from .log import get_logger
from .reload import apply_reload
from .stats import metrics_text, status

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = get_logger()

MAX_SHUTDOWN = 3600  # as [daemon] shutdown_timeout allows


def _server_name(request: dict[str, Any], required: bool) -> str | None:
    name = request.get("server")
    if name is None:
        if required:
            raise CommandError(f'{request["command"]} needs a "server" argument')
        return None
    if not isinstance(name, str):
        raise CommandError('"server" must be a string')
    return name


def reload_from_file(supervisor: Supervisor) -> dict[str, Any]:
    """Re-read the config the daemon was started with and apply it; DaemonError if refused.
    Either way it is logged once, `reload_done` or `reload_failed`, whoever asked."""
    supervisor.notifier.reloading()
    try:
        try:
            new = load_config(supervisor.config_path)
        except ConfigError as exc:
            problems = "; ".join(exc.problems)
            raise DaemonError(f"reload refused, nothing changed: {problems}") from exc
        result = apply_reload(supervisor, new)
    except DaemonError as exc:
        log.error("reload_failed", error=str(exc))
        raise
    finally:
        supervisor.notifier.ready(supervisor.status_line())
    log.info("reload_done", **result)
    return result


def command_table(supervisor: Supervisor) -> dict[str, Command]:
    sampler = supervisor.sampler

    def guarded(action: Callable[[], Any]) -> Any:
        try:
            return action()
        except DaemonError as exc:
            raise CommandError(str(exc)) from exc

    def ping(request: dict[str, Any]) -> Any:
        return "pong"

    def status_command(request: dict[str, Any]) -> Any:
        name = _server_name(request, required=False)
        if name is not None:
            guarded(lambda: supervisor.unit(name))
        return status(supervisor, sampler, name)

    def per_server(action: Callable[[str], None], done: str) -> Command:
        def command(request: dict[str, Any]) -> Any:
            name = _server_name(request, required=True)
            assert name is not None
            guarded(lambda: action(name))
            return {"server": name, "state": supervisor.units[name].state.value, "done": done}

        return command

    def reload(request: dict[str, Any]) -> Any:
        return guarded(lambda: reload_from_file(supervisor))

    def shutdown(request: dict[str, Any]) -> Any:
        timeout = request.get("timeout")
        # The bounds of [daemon] shutdown_timeout; a float() first so that a huge integer is
        # refused here rather than overflowing a timer later.
        if timeout is not None:
            try:
                valid = not isinstance(timeout, bool) and 0 <= float(timeout) <= MAX_SHUTDOWN
            except (TypeError, ValueError, OverflowError):
                valid = False
            if not valid:  # NaN and the infinities fail the comparison too
                raise CommandError(
                    f'"timeout" must be a number of seconds from 0 to {MAX_SHUTDOWN}'
                )
            timeout = float(timeout)
        supervisor.begin_shutdown(timeout)
        return {"phase": supervisor.phase.value}

    def upgrade(request: dict[str, Any]) -> Any:
        pid = guarded(supervisor.upgrade)
        return {"new_pid": pid, "done": "started; the new process takes over once it is ready"}

    def config(request: dict[str, Any]) -> Any:
        return dump_config(supervisor.config)

    def metrics(request: dict[str, Any]) -> Any:
        return metrics_text(supervisor, sampler)

    return {
        "ping": ping,
        "status": status_command,
        "reload": reload,
        "start": per_server(supervisor.start_server, "started"),
        "stop": per_server(supervisor.stop_server, "stopping"),
        "pause": per_server(supervisor.pause_server, "paused"),
        "resume": per_server(supervisor.resume_server, "resumed"),
        "shutdown": shutdown,
        "upgrade": upgrade,
        "config": config,
        "metrics": metrics,
    }
