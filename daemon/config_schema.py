"""The config schema: the field kinds, and a checker that runs a TOML table through a field table.

A field table (daemon.config declares two, for [daemon] and [servers.NAME]) maps each key to a
Field: a converter from the TOML value to the dataclass value, a default, and hooks that look at
the other keys. check_table() runs one TOML table through it and collects every problem, each
as a key path and a message, in the order the keys appear in the file.

Converters raise Invalid with a message that says what was expected and what was got; they never
raise anything else, whatever the input (the config is fuzzed). Messages quote values with
show(), which bounds their length and never fails.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A Unix socket path lives in sockaddr_un.sun_path, 108 bytes on Linux. A filesystem path keeps
# one byte for its terminating NUL; an abstract name starts with NUL and has no terminator.
UNIX_PATH_MAX: Final = 107

LISTEN_FORMS: Final = (
    'expected "HOST:PORT" (HOST an IP address or localhost), "[IPv6]:PORT", '
    '"unix:/absolute/path", "unix:@abstract-name" or "systemd:NAME"'
)

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


class Unknown:
    """The value of a key that is missing or invalid: no hook or default may rely on it."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = Unknown()


class Invalid(Exception):
    """A value that does not fit its field: one or more (sub-path, message) pairs.

    The sub-path extends the key's path: "[2]" for an element of a list, ".name" for a key of a
    table, "" for the value itself.
    """

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.items = [(where, message)]

    @classmethod
    def many(cls, items: list[tuple[str, str]]) -> Invalid:
        exc = cls(items[0][1], items[0][0])
        exc.items = items
        return exc


def show(value: Any, limit: int = 60) -> str:
    """repr() for messages: bounded, and safe for any value TOML can produce."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond str()'s digit limit; deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote_key(key: str) -> str:
    """A key as TOML writes it in a dotted path: bare if it can be, else a quoted string."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return json.dumps(key, ensure_ascii=False)


def key_path(*parts: str) -> str:
    return ".".join(quote_key(p) for p in parts)


Converter = Callable[[Any], Any]
# A hook sees every field's value (UNKNOWN for missing or invalid ones) and this key's value.
Hook = Callable[[Mapping[str, Any], Any], str | None]


@dataclass(frozen=True)
class Field:
    """One key of a table.

    - convert: TOML value -> dataclass value; raises Invalid.
    - default: the value when the key is absent, or a function of the fields declared before it.
    - required: when set, the key must be present; this says what to write. It may also be a
      function of the fields declared before it, giving that text, or None where the key is
      optional (then `default` applies).
    - inert: when the key has no effect here, the reason, e.g. 'with concurrency = "inline"';
      setting such a key is an error, and dump_config() leaves it out.
    - check: any other problem with the key's value given the other keys.
    - dump: dataclass value -> TOML value.
    """

    convert: Converter
    default: Any = None
    required: str | Callable[[Mapping[str, Any]], str | None] | None = None
    inert: Hook | None = None
    check: Hook | None = None
    dump: Callable[[Any], Any] = lambda value: value

    def default_for(self, values: Mapping[str, Any]) -> Any:
        return self.default(values) if callable(self.default) else self.default

    def required_for(self, values: Mapping[str, Any]) -> str | None:
        return self.required(values) if callable(self.required) else self.required


def check_table(
    table: Mapping[str, Any], fields: Mapping[str, Field], path: tuple[str, ...]
) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """Convert `table` by `fields`: (values with defaults filled in, [(position, problem)]).

    position is the key's index in `table` (missing keys sort last), so that sorting the
    problems puts them in file order. Values of missing or invalid keys are UNKNOWN.
    """
    position = {key: i for i, key in enumerate(table)}
    problems: list[tuple[int, str]] = []
    for key in table:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append((position[key], f"{key_path(*path, key)}: unknown key{hint}"))
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key in table:
            try:
                values[key] = field.convert(table[key])
            except Invalid as exc:
                values[key] = UNKNOWN
                for where, message in exc.items:
                    problems.append((position[key], f"{key_path(*path, key)}{where}: {message}"))
        elif (required := field.required_for(values)) is not None:
            values[key] = UNKNOWN
            problems.append((len(table), f"{key_path(*path, key)}: {required}"))
        else:
            values[key] = field.default_for(values)
    for key, field in fields.items():
        if key not in table or values[key] is UNKNOWN:
            continue
        where = key_path(*path, key)
        if field.inert and (reason := field.inert(values, values[key])):
            problems.append((position[key], f"{where}: {key} has no effect {reason}"))
        if field.check and (message := field.check(values, values[key])):
            problems.append((position[key], f"{where}: {message}"))
    return values, problems


# -- field kinds -----------------------------------------------------------------------------


def integer(lo: int, hi: int) -> Converter:
    def convert(value: Any) -> int:
        # bool is an int in Python, but `workers = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise Invalid(f"must be an integer >= {lo}, got {show(value)}")
        if value > hi:
            raise Invalid(f"must be an integer <= {hi}, got {show(value)}")
        return value

    return convert


def number(lo: float, hi: float, above: bool = False) -> Converter:
    """An int or float from lo (exclusive if `above`) to hi, as a float. NaN fails every test."""
    floor = f"> {lo:g}" if above else f">= {lo:g}"

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"must be a number {floor}, got {show(value)}")
        # Compared before float(): an int too big for a float must fail here, not overflow.
        if not (lo < value if above else lo <= value):
            raise Invalid(f"must be a number {floor}, got {show(value)}")
        if not value <= hi:
            raise Invalid(f"must be a number <= {hi:g}, got {show(value)}")
        return float(value)

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


def choice(*options: str, fold_case: bool = False) -> Converter:
    expected = ", ".join(f'"{o}"' for o in options)

    def convert(value: Any) -> str:
        key = value.lower() if fold_case and isinstance(value, str) else value
        if not isinstance(key, str) or key not in options:
            raise Invalid(f"must be one of {expected}, got {show(value)}")
        return key

    return convert


def nonempty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, got {show(value)}")
    return value


def unix_path_problem(path: str) -> str | None:
    """Why `path` cannot be a filesystem path for a Unix socket, or None."""
    if "\0" in path:
        return f"must not contain a NUL character, got {show(path)}"
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        return f"cannot be encoded as a file name, got {show(path)}"
    if size > UNIX_PATH_MAX:
        return f"is {size} bytes, longer than a unix socket path may be ({UNIX_PATH_MAX})"
    return None


def absolute_path(unix_socket: bool = False) -> Converter:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise Invalid(f"must be an absolute path, got {show(value)}")
        if unix_socket and (problem := unix_path_problem(value)):
            raise Invalid(problem)
        if "\0" in value:  # open() refuses it
            raise Invalid(f"must not contain a NUL character, got {show(value)}")
        return value

    return convert


def networks(value: Any) -> tuple[Network, ...]:
    """A list of CIDR strings; a bare address is a /32 or /128. Host bits set is an error."""
    if not isinstance(value, list):
        raise Invalid(f'must be a list of networks like ["10.0.0.0/8", "::1"], got {show(value)}')
    out: list[Network] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            message = f"must be a network string like '10.0.0.0/8', got {show(item)}"
            problems.append((f"[{i}]", message))
            continue
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                problems.append((f"[{i}]", f"{show(item)} is not an IP address or network"))
            else:
                message = f"{show(item)} has host bits set (the network is '{loose}')"
                problems.append((f"[{i}]", message))
            continue
        out.append(_unmapped(network))
    if problems:
        raise Invalid.many(problems)
    return tuple(out)


MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: Network) -> Network:
    """An IPv4-mapped IPv6 network (::ffff:10.0.0.0/104) is the IPv4 network it maps: clients
    arriving as ::ffff:10.1.2.3 are matched as 10.1.2.3, so that is how the rule must read."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(MAPPED):
        address = network.network_address.ipv4_mapped
        assert address is not None
        return ipaddress.IPv4Network((address, network.prefixlen - 96))
    return network


# A count of things (requests, connections): large enough for anything, small enough for a C int.
COUNT_MAX: Final = 2**31 - 1


def connection_rate(value: Any) -> tuple[int, int]:
    """[COUNT, SECONDS] (xinetd's cps): more than COUNT new connections in one second pause
    the server for SECONDS. Held as a tuple, written back as a list."""
    if not isinstance(value, list) or len(value) != 2:
        raise Invalid(
            f"must be a list of two integers [COUNT, SECONDS] like [50, 10], got {show(value)}"
        )
    problems: list[tuple[str, str]] = []
    out: list[int] = []
    for i, (item, check) in enumerate(
        zip(value, (integer(1, COUNT_MAX), integer(1, 86400)), strict=True)
    ):
        try:
            out.append(check(item))
        except Invalid as exc:
            problems.append((f"[{i}]", str(exc)))
    if problems:
        raise Invalid.many(problems)
    return (out[0], out[1])


def text(max_bytes: int) -> Converter:
    """A string of at most `max_bytes` bytes in UTF-8."""

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, got {show(value)}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise Invalid(f"is {size} bytes in UTF-8, more than {max_bytes}")
        return value

    return convert


TIME_RANGE = re.compile(r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})")
TIME_RANGE_FORM: Final = '"HH:MM-HH:MM" (00:00 to 23:59), like "08:00-18:00" or "22:00-06:00"'


def time_ranges(value: Any) -> tuple[tuple[int, int], ...]:
    """A list of "HH:MM-HH:MM" local times -> ((start_minute, end_minute), ...).

    Both ends are included; a range whose end is before its start wraps midnight.
    """
    if not isinstance(value, list):
        raise Invalid(f"must be a list of {TIME_RANGE_FORM}, got {show(value)}")
    out: list[tuple[int, int]] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        match = TIME_RANGE.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            problems.append((f"[{i}]", f"must be {TIME_RANGE_FORM}, got {show(item)}"))
            continue
        h1, m1, h2, m2 = (int(part) for part in match.groups())
        if max(h1, h2) > 23 or max(m1, m2) > 59:
            problems.append((f"[{i}]", f"{show(item)}: a time must be from 00:00 to 23:59"))
            continue
        out.append((h1 * 60 + m1, h2 * 60 + m2))
    if problems:
        raise Invalid.many(problems)
    return tuple(out)


def format_time_ranges(ranges: tuple[tuple[int, int], ...]) -> list[str]:
    """The inverse of time_ranges(): ((480, 1080),) -> ["08:00-18:00"]."""
    return [f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}" for a, b in ranges]


def free_table(value: Any) -> Mapping[str, Any]:
    """Any TOML table, as a read-only deep copy.

    Two values TOML can hold are refused, because they would break the promise that a config
    parses to the same thing every time and dumps to TOML that parses back equal: NaN (it is not
    equal to itself, so a reload would see a change that is not there) and integers outside
    TOML's 64-bit range (the TOML spec requires them to be rejected).
    """
    if not isinstance(value, dict):
        raise Invalid(f"must be a table, got {show(value)}")
    problems: list[tuple[str, str]] = []
    _scan(value, "", problems)
    if problems:
        raise Invalid.many(problems)
    return MappingProxyType(copy.deepcopy(value))


def _scan(value: Any, where: str, problems: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _scan(item, f"{where}.{quote_key(key)}", problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _scan(item, f"{where}[{i}]", problems)
    elif isinstance(value, float) and math.isnan(value):
        problems.append((where, "nan is not allowed (it never equals itself)"))
    elif isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        problems.append((where, "integer out of TOML's 64-bit range"))


def plain(value: Any) -> Any:
    """A read-only table back to what tomli_w writes: dicts and lists all the way down."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


# -- listen addresses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where a server listens: an IP address and port, or a Unix socket path.

    Built by parse_listen(); two spellings of one address ("localhost:7" and "127.0.0.1:7",
    "[::0001]:7" and "[::1]:7") give equal Addresses. str() is the canonical listen string.
    """

    kind: str  # "inet" | "unix" | "systemd"
    family: int  # socket.AF_INET | AF_INET6 | AF_UNIX; AF_UNSPEC for systemd (known at run time)
    host: str | None = None  # inet only; IPv6 without brackets
    port: int | None = None  # inet only; 0 picks a free port
    path: str | None = None  # unix only; an abstract name starts with "\0"
    name: str | None = None  # systemd only: the FileDescriptorName of a passed socket

    def sockaddr(self) -> tuple[str, int] | str:
        """What socket.bind() takes for this address (a systemd socket is never bound here)."""
        if self.kind == "systemd":
            raise ValueError(f"{self} is a socket passed by systemd, not an address to bind")
        if self.kind == "unix":
            assert self.path is not None
            return self.path
        assert self.host is not None and self.port is not None
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.kind == "systemd":
            return f"systemd:{self.name}"
        if self.kind == "unix":
            assert self.path is not None
            return "unix:" + ("@" + self.path[1:] if self.path.startswith("\0") else self.path)
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(value: Any) -> Address:
    """A listen string -> Address; Invalid saying which form is expected."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string; {LISTEN_FORMS}; got {show(value)}")
    if value.startswith("unix:"):
        return _parse_unix(value, value[len("unix:") :])
    if value.startswith("systemd:"):
        name = value[len("systemd:") :]
        # sd_listen_fds_with_names(3): up to 255 printable characters, no ':'.
        if not re.fullmatch(r"[A-Za-z0-9_.@+-]{1,255}", name):
            raise Invalid(
                f"{show(value)}: the name of a socket passed by systemd (its "
                "FileDescriptorName=) must be 1 to 255 of A-Z a-z 0-9 _ . @ + -"
            )
        return Address("systemd", socket.AF_UNSPEC, name=name)
    bracketed = re.fullmatch(r"\[([^\[\]]*)\]:([^:]*)", value)
    if bracketed:
        host, port = bracketed[1], bracketed[2]
    elif value.startswith("["):
        raise Invalid(f'{show(value)} is not of the form "[IPv6]:PORT"')
    else:
        host, colon, port = value.rpartition(":")
        if not colon:
            raise Invalid(f"{show(value)} has no port; {LISTEN_FORMS}")
        if ":" in host and _is_ipv6(host):
            raise Invalid(f"{show(value)}: an IPv6 address needs brackets, as in '[::1]:7007'")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise Invalid(f"{show(value)}: the port must be a number from 0 to 65535, got {show(port)}")
    if host.lower() == "localhost" and not bracketed:
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(
            f"{show(value)}: the host must be an IP address or localhost; {LISTEN_FORMS}"
        ) from None
    if bracketed and ip.version == 4:
        raise Invalid(f"{show(value)}: brackets are for IPv6 addresses; write '{ip}:{port}'")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address("inet", family, host=str(ip), port=int(port))


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _parse_unix(value: str, rest: str) -> Address:
    if rest.startswith("@"):
        name = rest[1:]
        if not name:
            raise Invalid(f"{show(value)}: the abstract socket name is empty")
        problem = unix_path_problem("/" + name)  # the same limits; "/" stands in for the NUL
        if problem:
            raise Invalid(f"{show(value)}: the abstract socket name {problem}")
        return Address("unix", socket.AF_UNIX, path="\0" + name)
    if not rest.startswith("/"):
        raise Invalid(f"{show(value)}: a unix socket path must be absolute; {LISTEN_FORMS}")
    if problem := unix_path_problem(rest):
        raise Invalid(f"{show(value)}: the path {problem}")
    return Address("unix", socket.AF_UNIX, path=rest)
