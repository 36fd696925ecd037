"""The common ground of `selectd convert`: a service read from an inetd-style file, the notes on
what did not carry over, and the rules that turn the service into a [servers.NAME] table.

The readers (convert_xinetd, convert_inetd) fill in a Service in selectd's terms and note, with
the file and line, whatever has no equivalent; finish() then drops the keys that would have no
effect on the server it became (each with a note), and checks the table against the real schema,
so that what convert prints always passes `selectd check`. Nothing is dropped without a note.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Final

import tomli_w

from servers.services import BUILTIN_SERVICES

from .config import SERVER_FIELDS, ConfigError, parse_config

# Keys that only a command server takes: the built-ins run inside selectd, as its own user.
COMMAND_ONLY: Final = (
    "env", "passenv", "cwd", "user", "group", "rlimit_cpu", "rlimit_nofile", "rlimit_as",
)  # fmt: skip
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class ConvertError(Exception):
    """A file that cannot be converted at all (unreadable, or not in the format): the message
    names the file, and the line when there is one."""


@dataclass(frozen=True)
class Note:
    """Something in the source with no exact equivalent in selectd, and where it was."""

    source: str
    line: int
    service: str  # "service echo", "defaults", ...
    text: str

    def __str__(self) -> str:
        return printable(f"{self.source}:{self.line}: {self.service}: {self.text}")


def printable(text: str) -> str:
    """One line that is safe in a TOML comment and on any terminal: control characters (a
    newline would end the comment) and undecodable file-name bytes become escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\x{ord(m[0]):02x}", text)


@dataclass
class Service:
    """One service as read from the source, described in selectd's keys.

    The reader sets `keys` (listen, socket_type, command or handler, and any other key of
    [servers.NAME]) and `key_lines` (where each came from, for notes), or calls skip().
    """

    name: str  # as the source names it
    source: str
    line: int  # where its entry starts
    kind: str = "service"  # what notes call it: "service echo"
    protocol: str = ""  # "tcp", "udp", "tcp6", ...: tells apart services that share a name
    keys: dict[str, Any] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    skipped: bool = False

    def note(self, text: str, line: int | None = None) -> None:
        where = self.line if line is None else line
        self.notes.append(Note(self.source, where, f"{self.kind} {self.name}", text))

    def skip(self, text: str, line: int | None = None) -> None:
        self.note(f"{text}; not converted", line)
        self.skipped = True

    def set(self, key: str, value: Any, line: int) -> None:
        self.keys[key] = value
        self.key_lines[key] = line

    def drop(self, key: str, why: str) -> None:
        line = self.key_lines.pop(key, None)
        value = self.keys.pop(key)
        self.note(f"{key} = {shown(value)} dropped: {why}", line)

    @property
    def runs_command(self) -> bool:
        return "command" in self.keys


def shown(value: Any) -> str:
    """A value as a note quotes it, on one line."""
    return json.dumps(value, ensure_ascii=False)


def finish(service: Service) -> dict[str, Any] | None:
    """The [servers.NAME] table for `service`, or None when it cannot be one (noted)."""
    if service.skipped:
        return None
    keys = service.keys
    if not service.runs_command:
        for key in COMMAND_ONLY:
            if key in keys:
                service.drop(key, "a built-in service runs inside selectd, as selectd's user")
    if keys.get("socket_type") == "dgram" and "banner_fail" in keys:
        service.drop("banner_fail", "a datagram service has no connection to write it to")
    table = {key: keys[key] for key in SERVER_FIELDS if key in keys}
    problems = check_table(table)
    if problems:
        # A rule above missed something: say what, rather than print a config that fails.
        for problem in problems:
            service.note(f"selectd would refuse it: {problem}")
        service.skip("it does not make a valid server")
        return None
    return table


def check_table(table: dict[str, Any]) -> list[str]:
    """What `selectd check` says about one [servers.NAME] table, without the key path prefix."""
    try:
        parse_config(tomli_w.dumps({"servers": {"s": table}}))
    except ConfigError as exc:
        return [p.removeprefix("servers.s.") for p in exc.problems]
    return []


def server_names(services: list[Service]) -> list[str]:
    """A [servers.NAME] name for each service: its own name made safe, with the protocol (or
    socket type) added where two would be the same, and a number where that is not enough."""
    bases = [safe_name(s.name) for s in services]
    names = [
        f"{base}-{s.protocol or s.keys.get('socket_type', 'stream')}"
        if bases.count(base) > 1
        else base
        for base, s in zip(bases, services, strict=True)
    ]
    taken: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        out.append(unique)
    return out


def safe_name(name: str) -> str:
    return SAFE_NAME.sub("-", name).strip("-") or "service"


# -- what the readers share ------------------------------------------------------------------


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise ConvertError(
            f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConvertError(f"{path}:{line}: cannot read: not UTF-8 text") from None


def builtin_for(*names: str) -> str | None:
    """The built-in service among `names` ("echo-stream" is echo), or None."""
    for name in names:
        base = re.sub(r"-(stream|dgram)$", "", name)
        if base in BUILTIN_SERVICES:
            return base
    return None


def service_port(name: str, protocol: str) -> int | None:
    """The port /etc/services gives `name` for "tcp" or "udp", or None."""
    try:
        return socket.getservbyname(name, protocol)
    except (OSError, UnicodeError, ValueError):
        return None


def parse_port(text: str) -> int | None:
    if re.fullmatch(r"[0-9]{1,5}", text) and 0 < int(text) <= 65535:
        return int(text)
    return None


def listen_string(host: str | None, port: int, ipv6: bool) -> str:
    """host (an IP address, or None for every address of the family) and port -> listen."""
    if host is None:
        host = "::" if ipv6 else "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_address(service: Service, host: str, ipv6: bool, line: int) -> str | None:
    """An address to bind from a source's host: an IP address as is; a name resolved now,
    with a note (selectd takes addresses only); None, skipping the service, if it does not."""
    if host.lower() == "localhost":
        return "::1" if ipv6 else "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    try:
        found = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        found = []
    if not found:
        service.skip(f"the address {host!r} does not resolve (selectd listens on IP addresses)")
        return None
    address = str(found[0][4][0])
    service.note(f"{host!r} resolved to {address} now; selectd listens on IP addresses", line)
    return address


def unwrap_command(service: Service, program: str, argv: list[str], line: int) -> list[str]:
    """The command for `program` run with `argv` (argv[0] included, as inetd writes it).

    selectd runs command[0] with command as its argv, so an argv[0] that differs from the
    program's name cannot be kept. tcpd (TCP wrappers) chooses the real server by its argv[0]:
    that server is run directly instead, and hosts.allow / hosts.deny no longer apply.
    """
    args = argv[1:]
    name = argv[0] if argv else os.path.basename(program)
    if os.path.basename(program) == "tcpd" and argv:
        real = name if name.startswith("/") else os.path.join("/usr/sbin", name)
        service.note(
            f"tcpd (TCP wrappers) is left out: {real} runs directly, and /etc/hosts.allow and "
            "/etc/hosts.deny no longer apply to it (use allow and deny)",
            line,
        )
        return [real, *args]
    if os.path.basename(name) != os.path.basename(program):
        service.note(
            f"argv[0] {name!r} is not kept: selectd runs {program} with argv[0] = {program!r}",
            line,
        )
    return [program, *args]


# xinetd's address forms; inetd has none (it leaves access control to tcpd).
_FACTORIZED = re.compile(r"((?:[0-9]{1,3}\.){0,3})\{([0-9,\s]+)\}")


def networks_for(token: str) -> list[str] | None:
    """The networks an xinetd only_from / no_access entry stands for, or None when it names
    hosts by name (selectd matches addresses only).

    "10.0.0.0/8" and "::1" as they are; "10.1.0.*" as 10.1.0.0/24 and "10.1.0.0" as
    10.1.0.0/16 (trailing zeros are wildcards); "10.1.{2,3}" as 10.1.2.0/24 and 10.1.3.0/24;
    "localhost" as 127.0.0.1 and ::1.
    """
    if token.lower() == "localhost":
        return ["127.0.0.1/32", "::1/128"]
    factorized = _FACTORIZED.fullmatch(token)
    if factorized:
        prefix = factorized[1]
        out: list[str] = []
        for part in factorized[2].split(","):
            one = networks_for(prefix + part.strip()) if part.strip() else None
            if one is None:
                return None
            out += one
        return out
    if ":" in token or "/" in token:
        try:
            return [str(ipaddress.ip_network(token, strict=False))]
        except ValueError:
            return None
    parts = token.split(".")
    if not 1 <= len(parts) <= 4 or not all(
        p == "*" or re.fullmatch(r"[0-9]{1,3}", p) for p in parts
    ):
        return None
    # Trailing "*" components are wildcards; without any, trailing zeros are (xinetd's rule:
    # 10.1.0.0 is 10.1.*.*); a part left out is one too.
    fixed = list(parts)
    wildcard = "*" if "*" in parts else "0"
    while fixed and fixed[-1] == wildcard:
        fixed.pop()
    if "*" in fixed or any(int(p) > 255 for p in fixed):
        return None
    address = ".".join(fixed + ["0"] * (4 - len(fixed)))
    return [str(ipaddress.ip_network(f"{address}/{8 * len(fixed)}"))]
