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

from .config_handler import HANDLER_FORMS, resolve_handler
from .config_schema import (
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
    free_table,
    integer,
    key_path,
    networks,
    nonempty_string,
    number,
    parse_listen,
    plain,
    show,
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


@dataclass(frozen=True)
class ServerConfig:
    """One [servers.NAME] table. Keys that have no effect for this server hold their defaults."""

    name: str
    listen: Address
    socket_type: str  # "stream" | "dgram"
    handler: str  # as written: a built-in service name or "package.module:Class"
    concurrency: str  # "inline" | "thread" | "fork"
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

    def handler_class(self) -> type:
        """Resolve the handler now (imports its module); ValueError if it cannot be."""
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
}

DEFAULT_WORKERS: Final = {"thread": 16, "fork": 4, "inline": 1}


def _is_unix(values: Mapping[str, Any]) -> bool:
    listen = values["listen"]
    return isinstance(listen, Address) and listen.kind == "unix"


def _is_inet(values: Mapping[str, Any]) -> bool:
    listen = values["listen"]
    return isinstance(listen, Address) and listen.kind == "inet"


def _inline_only(values: Mapping[str, Any], _value: Any) -> str | None:
    return 'with concurrency = "inline"' if values["concurrency"] == "inline" else None


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


def _check_concurrency(values: Mapping[str, Any], value: Any) -> str | None:
    if value == "fork" and values["socket_type"] == "dgram":
        return (
            'concurrency = "fork" needs socket_type = "stream" '
            "(the fork pool hands over connections)"
        )
    return None


def _check_handler(values: Mapping[str, Any], value: Any) -> str | None:
    if values["socket_type"] is UNKNOWN:
        return None  # which handler fits depends on it
    try:
        resolve_handler(value, values["socket_type"])
    except ValueError as exc:
        return str(exc)
    return None


# Order matters: a default may depend on the fields above it.
SERVER_FIELDS: Final[Mapping[str, Field]] = {
    "listen": Field(parse_listen, required=f"missing (required); {LISTEN_FORMS}", dump=str),
    "socket_type": Field(choice("stream", "dgram"), default="stream"),
    "handler": Field(
        nonempty_string,
        required=f"missing (required); expected {HANDLER_FORMS}",
        check=_check_handler,
    ),
    "concurrency": Field(
        choice("inline", "thread", "fork"),
        default=lambda v: "inline" if v["socket_type"] == "dgram" else "thread",
        check=_check_concurrency,
    ),
    "workers": Field(
        integer(1, 1024),
        default=lambda v: DEFAULT_WORKERS.get(v["concurrency"], 1),
        inert=_inline_only,
    ),
    "max_queue": Field(integer(0, 65536), default=128, inert=_inline_only),
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
    "options": Field(free_table, default=lambda _: MappingProxyType({}), dump=plain),
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
