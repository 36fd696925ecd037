"""selectd's configuration: one TOML file -> frozen dataclasses, validated in one place.

    config = load_config(path)        # path, "-" for stdin, None for $SELECTD_CONFIG or the default
    config = parse_config(text, source)
    text = dump_config(config)        # every default filled in; parses back equal

Every key is declared once, in DAEMON_FIELDS and SERVER_FIELDS below: its kind, its default, and
when it has no effect. The same tables serve `selectd check` (ConfigError lists every problem,
each naming its key path, in file order), `selectd config` (dump_config) and reload, which compares
ServerConfigs: two parses of the same text are equal, field by field.

The schema is strict: an unknown key, a key that has no effect where it is set (`workers` with
concurrency = "inline"), or a handler that does not import, is an error, not a warning. A config
that `check` passes is one the daemon can start from, short of the OS refusing a bind.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Final

import tomli_w

from . import scheduling
from .config_handler import (
    COMMAND_FORM,
    HANDLER_FORMS,
    account_name,
    byte_size,
    command,
    env_names,
    environment,
    format_bytes,
    resolve_handler,
)
from .config_schema import (
    COUNT_MAX,
    LISTEN_FORMS,
    UNKNOWN,
    Address,
    Field,
    Invalid,
    Network,
    absolute_path,
    boolean,
    check_table,
    choice,
    connection_rate,
    format_time_ranges,
    free_table,
    integer,
    key_path,
    networks,
    nonempty_string,
    number,
    parse_listen,
    plain,
    show,
    text,
    time_ranges,
)

__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "ServerConfig",
    "default_control_socket",
    "dump_config",
    "load_config",
    "parse_config",
    "resolve_handler",
]

DEFAULT_SOURCE: Final = "<default>"
STDIN_SOURCE: Final = "<stdin>"
SERVER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ConfigError(Exception):
    """A config that cannot be used: `problems` has one line per problem, "key.path: message"."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        # Lone surrogates (from a file name or a string in the file) would make printing the
        # message fail; show them as escapes instead.
        self.problems = [p.encode("utf-8", "backslashreplace").decode("utf-8") for p in items]
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        return (type(self), (self.problems,))


@dataclass(frozen=True)
class DaemonConfig:
    """The [daemon] table."""

    control_socket: str
    log_format: str  # "auto" | "json" | "console"
    log_level: str  # "debug" | "info" | "warning" | "error" | "critical"
    shutdown_timeout: float
    pidfile: str | None
    user: str | None
    group: str | None
    metrics_listen: Address | None = None  # HTTP /metrics and /healthz, when set
    thread_cpu: int | None = None  # the one CPU every thread pool runs on, when set


@dataclass(frozen=True)
class ServerConfig:
    """One [servers.NAME] table. Keys that have no effect for this server hold their defaults.

    A server runs either a handler class (`handler`) or a program per request (`command`,
    inetd's model: its concurrency is then "exec"). The keys after `options` have defaults here
    too, so that code building a ServerConfig by hand need not know every key.
    """

    name: str
    listen: Address
    socket_type: str  # "stream" | "dgram"
    handler: str | None  # as written: a built-in service name or "package.module:Class"
    concurrency: str  # "inline" | "thread" | "fork", or "exec" for a command server
    workers: int
    max_queue: int
    request_queue_size: int
    allow_reuse_address: bool
    allow_reuse_port: bool
    timeout: float  # seconds; 0 = none
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]
    enabled: bool
    options: Mapping[str, Any]  # read-only; free-form, for the handler (self.server.options)
    # A command server: the program and its arguments, and what it runs with.
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # read-only
    passenv: tuple[str, ...] = ()  # names of the daemon's variables the program also gets
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    rlimit_cpu: int | None = None  # seconds
    rlimit_nofile: int | None = None
    rlimit_as: int | None = None  # bytes
    # Limits on requests, for every server (xinetd's).
    instances: int | None = None  # concurrent requests; None: unlimited
    per_source: int | None = None  # concurrent connections from one client address
    cps: tuple[int, int] | None = None  # (count, seconds): over count/s pauses it for seconds
    banner_fail: str | None = None  # sent to a refused or denied client before the close
    access_times: tuple[tuple[int, int], ...] = ()  # (first, last minute of the day); () = always
    # Fork pool worker health (gunicorn's); None: off.
    worker_timeout: float | None = None  # seconds on one request before the worker is killed
    max_requests: int | None = None  # requests before a worker is retired
    max_requests_jitter: int = 0  # a random 0..jitter added to max_requests per worker
    max_rss: int | None = None  # bytes of RSS past which a worker is retired
    # The kernel policy workers, pool threads or programs run under (scheduling.py); None:
    # the daemon's own.
    scheduling_policy: str | None = None

    def handler_class(self) -> type:
        """Resolve the handler now (imports its module); ValueError if it cannot be, or if
        this is a command server (it has no handler class)."""
        if self.handler is None:
            raise ValueError(
                f"{key_path('servers', self.name)} runs a command, it has no handler class"
            )
        return resolve_handler(self.handler, self.socket_type)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    servers: Mapping[str, ServerConfig]  # read-only, in file order
    # Where it came from: the file, "<default>" (the embedded default) or "<stdin>" (-c -).
    # Not part of equality: the same settings read from elsewhere are the same config.
    source: str | None = field(default=None, compare=False)


def default_control_socket() -> str:
    """$XDG_RUNTIME_DIR/selectd/control.sock, else /tmp/selectd-$UID/control.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return os.path.join(runtime, "selectd", "control.sock")
    return f"/tmp/selectd-{os.getuid()}/control.sock"


# -- the schema ------------------------------------------------------------------------------


def inet_listen(value: Any) -> Address:
    """A TCP address for the metrics endpoint: "127.0.0.1:9107" or "[::1]:9107"."""
    address = parse_listen(value)
    if address.kind != "inet":
        raise Invalid(f"must be HOST:PORT or [IPv6]:PORT (an HTTP endpoint), got {show(value)}")
    return address


DAEMON_FIELDS: Final[Mapping[str, Field]] = {
    "control_socket": Field(
        absolute_path(unix_socket=True), default=lambda _: default_control_socket()
    ),
    "log_format": Field(choice("auto", "json", "console"), default="auto"),
    "log_level": Field(
        choice("debug", "info", "warning", "error", "critical", fold_case=True), default="info"
    ),
    "shutdown_timeout": Field(number(0, 3600, above=True), default=10.0),
    "pidfile": Field(absolute_path()),
    # Whether they exist is checked at startup, where the daemon switches to them.
    "user": Field(nonempty_string),
    "group": Field(nonempty_string),
    "metrics_listen": Field(inet_listen, dump=str),
    # Whether this process may run there is checked at startup.
    "thread_cpu": Field(integer(0, 4095)),
}

DEFAULT_WORKERS: Final = {"thread": 16, "fork": 4, "inline": 1}


def _is_unix(values: Mapping[str, Any]) -> bool:
    listen = values["listen"]
    return isinstance(listen, Address) and listen.kind == "unix"


def _is_inet(values: Mapping[str, Any]) -> bool:
    listen = values["listen"]
    return isinstance(listen, Address) and listen.kind == "inet"


def _runs_command(values: Mapping[str, Any]) -> bool:
    return values["command"] is not None and values["command"] is not UNKNOWN


def _with_command(values: Mapping[str, Any], _value: Any) -> str | None:
    if _runs_command(values):
        return "with command (each request runs the program in a process of its own)"
    return None


def _no_pool(values: Mapping[str, Any], value: Any) -> str | None:
    if reason := _with_command(values, value):
        return reason
    return 'with concurrency = "inline"' if values["concurrency"] == "inline" else None


def _nr_open() -> int:
    """The kernel's ceiling on a process's open files (fs.nr_open): no rlimit goes above it."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return COUNT_MAX  # not Linux, or hidden: the program's setrlimit will say


def _open_files_limit(value: Any) -> int:
    """rlimit_nofile: at least 3 (stdio), at most what this machine lets any process have:
    above that the program's setrlimit fails, and so does every connection."""
    return integer(3, _nr_open())(value)


def _command_only(values: Mapping[str, Any], _value: Any) -> str | None:
    # Not judged when neither is set: that error is reported on handler already.
    if values["command"] is None and values["handler"] is not UNKNOWN:
        return "without command (it applies to the program a command server runs)"
    return None


def _fork_only(values: Mapping[str, Any], _value: Any) -> str | None:
    concurrency = values["concurrency"]
    if concurrency is not UNKNOWN and concurrency != "fork":
        return 'without concurrency = "fork" (it is about the fork pool\'s workers)'
    return None


def _in_the_loop(values: Mapping[str, Any], _value: Any) -> str | None:
    if values["concurrency"] == "inline":
        return (
            'with concurrency = "inline" '
            "(its handler runs in the loop, whose policy is the daemon's)"
        )
    return None


def _jitter_needs_max_requests(values: Mapping[str, Any], value: Any) -> str | None:
    if reason := _fork_only(values, value):
        return reason
    return "without max_requests" if values["max_requests"] is None else None


def _not_on_unix(values: Mapping[str, Any], _value: Any) -> str | None:
    return "on a unix socket" if _is_unix(values) else None


def _acl_on_unix(values: Mapping[str, Any], value: Any) -> str | None:
    # An empty list is what dump_config() writes for every server, so it is allowed.
    if value and _is_unix(values):
        return "on a unix socket (its clients have no IP address)"
    return None


def _backlog_on_dgram(values: Mapping[str, Any], _value: Any) -> str | None:
    if values["socket_type"] == "dgram":
        return 'with socket_type = "dgram" (it is the listen backlog of a stream socket)'
    return None


def _timeout_on_dgram(values: Mapping[str, Any], _value: Any) -> str | None:
    if values["socket_type"] == "dgram":
        return 'with socket_type = "dgram" (it is a per-connection timeout)'
    return None


def _banner_on_dgram(values: Mapping[str, Any], _value: Any) -> str | None:
    if values["socket_type"] == "dgram":
        return 'with socket_type = "dgram" (it is written to a connection before closing it)'
    return None


def _concurrency(value: Any) -> str:
    # "exec" is what a command server gets; the message lists what a handler server may set.
    return "exec" if value == "exec" else _CONCURRENCY(value)


_CONCURRENCY: Final = choice("inline", "thread", "fork")


def _default_concurrency(values: Mapping[str, Any]) -> str:
    if values["command"] is not None:
        return "exec"
    return "inline" if values["socket_type"] == "dgram" else "thread"


def _check_concurrency(values: Mapping[str, Any], value: Any) -> str | None:
    if value == "exec" and values["command"] is None:
        return (
            'concurrency = "exec" is what a server with a command gets; '
            'a handler runs "inline", "thread" or "fork"'
        )
    if value == "fork" and values["socket_type"] == "dgram":
        return (
            'concurrency = "fork" needs socket_type = "stream" '
            "(the fork pool hands over connections)"
        )
    return None


def _handler_required(values: Mapping[str, Any]) -> str | None:
    if values["command"] is not None:
        return None  # a command server (or an invalid command, reported already)
    return f"missing (required); expected {HANDLER_FORMS}; or set command, {COMMAND_FORM}"


def _check_handler(values: Mapping[str, Any], value: Any) -> str | None:
    if values["command"] is not None:
        return "set handler or command, not both (a server runs a handler class or a program)"
    if values["socket_type"] is UNKNOWN:
        return None  # which handler fits depends on it
    try:
        resolve_handler(value, values["socket_type"])
    except ValueError as exc:
        return str(exc)
    return None


def _dump_tuple(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


# Order matters: a default may depend on the fields above it. It is also the order of a dump.
SERVER_FIELDS: Final[Mapping[str, Field]] = {
    "listen": Field(parse_listen, required=f"missing (required); {LISTEN_FORMS}", dump=str),
    "socket_type": Field(choice("stream", "dgram"), default="stream"),
    # Exactly one of command and handler: the one that is missing is required unless the other
    # is there, and _check_handler refuses both.
    "command": Field(command, dump=_dump_tuple),
    "handler": Field(nonempty_string, required=_handler_required, check=_check_handler),
    "concurrency": Field(
        _concurrency, default=_default_concurrency, inert=_with_command, check=_check_concurrency
    ),
    "workers": Field(
        integer(1, 1024),
        default=lambda v: DEFAULT_WORKERS.get(v["concurrency"], 1),
        inert=_no_pool,
    ),
    "max_queue": Field(integer(0, 65536), default=128, inert=_no_pool),
    "request_queue_size": Field(integer(1, 65535), default=128, inert=_backlog_on_dgram),
    "allow_reuse_address": Field(
        boolean,
        default=lambda v: v["socket_type"] == "stream" and _is_inet(v),
        inert=_not_on_unix,
    ),
    "allow_reuse_port": Field(boolean, default=False, inert=_not_on_unix),
    "timeout": Field(number(0, 86400), default=60.0, inert=_timeout_on_dgram),
    "allow": Field(networks, default=(), inert=_acl_on_unix, dump=lambda t: [str(n) for n in t]),
    "deny": Field(networks, default=(), inert=_acl_on_unix, dump=lambda t: [str(n) for n in t]),
    "enabled": Field(boolean, default=True),
    # Limits on requests (xinetd's), for every server.
    "instances": Field(integer(1, COUNT_MAX)),
    "per_source": Field(integer(1, COUNT_MAX), inert=_acl_on_unix),
    "cps": Field(connection_rate, dump=_dump_tuple),
    "banner_fail": Field(text(4096), inert=_banner_on_dgram),
    "access_times": Field(time_ranges, default=(), dump=format_time_ranges),
    # Fork pool worker health (gunicorn's).
    "worker_timeout": Field(number(0, 86400, above=True), inert=_fork_only),
    "max_requests": Field(integer(1, COUNT_MAX), inert=_fork_only),
    "max_requests_jitter": Field(
        integer(0, COUNT_MAX), default=0, inert=_jitter_needs_max_requests
    ),
    "max_rss": Field(byte_size, inert=_fork_only, dump=format_bytes),
    "scheduling_policy": Field(choice(*scheduling.POLICIES), inert=_in_the_loop),
    # What a command's program runs with.
    "env": Field(
        environment, default=lambda _: MappingProxyType({}), inert=_command_only, dump=plain
    ),
    "passenv": Field(env_names, default=(), inert=_command_only, dump=_dump_tuple),
    "cwd": Field(absolute_path(), inert=_command_only),
    "user": Field(account_name, inert=_command_only),
    "group": Field(account_name, inert=_command_only),
    "rlimit_cpu": Field(integer(1, COUNT_MAX), inert=_command_only),
    "rlimit_nofile": Field(_open_files_limit, inert=_command_only),
    "rlimit_as": Field(byte_size, inert=_command_only, dump=format_bytes),
    "options": Field(
        free_table, default=lambda _: MappingProxyType({}), inert=_with_command, dump=plain
    ),
}


# -- parse, load, dump -----------------------------------------------------------------------


def parse_config(text: str, source: str | None = None) -> Config:
    """Parse and validate a TOML config. Raises ConfigError listing every problem."""
    where = source or "<string>"
    doc = _load_toml(text, where)
    problems: list[str] = []
    daemon: dict[str, Any] = {}
    servers: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        if key == "daemon":
            daemon = _check_daemon(value, problems)
        elif key == "servers":
            servers = _check_servers(value, problems)
        else:
            problems.append(f"{key_path(key)}: unknown key (expected [daemon] and [servers.NAME])")
    if "daemon" not in doc:
        daemon = _check_daemon({}, problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        daemon=DaemonConfig(**daemon),
        servers=MappingProxyType(
            {name: ServerConfig(name=name, **values) for name, values in servers.items()}
        ),
        source=source,
    )


def load_config(path: str | None = None) -> Config:
    """Load `path` ("-": stdin; None: $SELECTD_CONFIG if set, else the embedded default)."""
    if path is None:
        path = os.environ.get("SELECTD_CONFIG") or None
    if path is None:
        default = resources.files(__package__ or "daemon").joinpath("default.toml")
        return parse_config(default.read_text(encoding="utf-8"), DEFAULT_SOURCE)
    if path == "-":
        return parse_config(_decode(_read_stdin(), STDIN_SOURCE), STDIN_SOURCE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{path}: cannot read: {reason}") from None
    return parse_config(_decode(data, path), path)


def dump_config(config: Config) -> str:
    """The effective config as TOML: every key with its value, defaults included.

    Keys that have no effect for a server (workers with concurrency = "inline", ...) are left
    out, since setting them is an error; so are unset optional keys (pidfile, user, group).
    """
    doc = {
        "daemon": _dump_table(config.daemon, DAEMON_FIELDS),
        "servers": {
            name: _dump_table(server, SERVER_FIELDS) for name, server in config.servers.items()
        },
    }
    header = f"# selectd: the effective config of {show(config.source, 200)}, defaults filled in\n"
    return header + tomli_w.dumps(doc)


def _load_toml(text: str, where: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the config must be text, got {type(text).__name__}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {_syntax_message(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: TOML syntax error: values nested too deeply") from None
    except ValueError as exc:  # an integer literal beyond int()'s digit limit
        raise ConfigError(f"{where}: TOML syntax error: {exc}") from None


def _syntax_message(exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's "Invalid value (at line 3, column 20)" -> "TOML syntax error at line 3, ..."."""
    message = str(exc)
    at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if at:
        return f"TOML syntax error at line {at[2]}, column {at[3]}: {_lower_first(at[1])}"
    end = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if end:
        return f"TOML syntax error at the end of the document: {_lower_first(end[1])}"
    return f"TOML syntax error: {message}"


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:]


def _read_stdin() -> bytes:
    try:
        stream = getattr(sys.stdin, "buffer", None)
        if stream is not None:
            return stream.read()
        return sys.stdin.read().encode("utf-8", "surrogateescape")
    except (OSError, ValueError, AttributeError) as exc:  # closed or absent stdin
        raise ConfigError(f"{STDIN_SOURCE}: cannot read: {exc}") from None


def _decode(data: bytes, where: str) -> str:
    try:
        # TOML is UTF-8; an editor's byte-order mark is forgiven.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise ConfigError(f"{where}: cannot read: not UTF-8 text ({bad})") from None


def _check_daemon(value: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.append(f"daemon: must be a table, got {show(value)}")
        value = {}
    values, found = check_table(value, DAEMON_FIELDS, ("daemon",))
    problems += [message for _, message in sorted(found, key=lambda p: p[0])]
    return values


def _check_servers(value: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        problems.append(f"servers: must be a table of [servers.NAME] tables, got {show(value)}")
        return {}
    servers: dict[str, dict[str, Any]] = {}
    # Who holds each address, to catch two servers on one: (Address, socket_type) for IP,
    # the path alone for Unix sockets (stream and dgram cannot share one file).
    holders: dict[Any, tuple[str, str]] = {}
    for name, table in value.items():
        path = key_path("servers", name)
        if not SERVER_NAME.fullmatch(name):
            problems.append(f"{path}: a server name must match [A-Za-z0-9_.-]+")
        if not isinstance(table, dict):
            problems.append(f"{path}: must be a table, got {show(table)}")
            continue
        values, found = check_table(table, SERVER_FIELDS, ("servers", name))
        if conflict := _conflict(name, values, holders):
            found.append((list(table).index("listen"), f"{path}.listen: {conflict}"))
        problems += [message for _, message in sorted(found, key=lambda p: p[0])]
        servers[name] = values
    return servers


def _conflict(
    name: str, values: Mapping[str, Any], holders: dict[Any, tuple[str, str]]
) -> str | None:
    listen, socket_type = values["listen"], values["socket_type"]
    if not isinstance(listen, Address) or socket_type is UNKNOWN or listen.port == 0:
        return None
    key = ("unix", listen.path) if listen.kind == "unix" else (listen, socket_type)
    if key not in holders:
        holders[key] = (name, socket_type)
        return None
    holder, holder_type = holders[key]
    message = f'"{listen}" ({socket_type}) is already used by {key_path("servers", holder)}'
    if holder_type != socket_type:
        message += f" ({holder_type}; a unix socket path is one file, whatever the socket type)"
    return message


def _dump_table(obj: Any, fields: Mapping[str, Field]) -> dict[str, Any]:
    values = {key: getattr(obj, key) for key in fields}
    out: dict[str, Any] = {}
    for key, spec in fields.items():
        value = values[key]
        if value is None or (spec.inert and spec.inert(values, value)):
            continue
        out[key] = spec.dump(value)
    return out
