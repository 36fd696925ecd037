"""What a server runs: a request handler class (`handler`), or a program (`command`).

A handler is a built-in service name (servers.services.BUILTIN_SERVICES) or
"package.module:Class", where Class may be a dotted path ("mod:Outer.Inner"). The class must
derive from the BaseRequestHandler of `servers` or of the stdlib's socketserver: selectd runs
stdlib handlers unchanged. resolve_handler() fails with a ValueError with a one-line message,
never a traceback: config checking reports it against the key path, and `selectd check` is where
an operator finds a broken import.

A command is inetd's model: a program and its arguments, run per request with the connection as
its stdin and stdout. The field kinds below (command, environment, env_names, account_name,
byte_size) describe that program and the limits it runs under; like every field kind they raise
Invalid, and refuse what execve() or setrlimit() would refuse later (a NUL in an argument, "=" in
a variable name), so that a config `check` passes is one the daemon can start.
"""

from __future__ import annotations

import re
import socketserver
from importlib import import_module
from types import MappingProxyType
from typing import Any, Final

import servers
from servers.services import BUILTIN_SERVICES

from .config_schema import INT64_MAX, Invalid, quote_key, show

HANDLER_BASES = (servers.BaseRequestHandler, socketserver.BaseRequestHandler)
STREAM_BASES = (servers.StreamRequestHandler, socketserver.StreamRequestHandler)
DATAGRAM_BASES = (servers.DatagramRequestHandler, socketserver.DatagramRequestHandler)

HANDLER_FORMS = f'a built-in service ({", ".join(BUILTIN_SERVICES)}) or "package.module:Class"'


def resolve_handler(spec: str, socket_type: str) -> type:
    """The handler class `spec` names, for a server of `socket_type` ("stream" or "dgram").

    The module is imported (or taken from sys.modules) on every call: a reload that names
    another module picks it up. Raises ValueError saying what is wrong.
    """
    if socket_type not in ("stream", "dgram"):
        raise ValueError(f'socket_type must be "stream" or "dgram", got {socket_type!r}')
    service = BUILTIN_SERVICES.get(spec)
    if service is not None:
        return service.stream if socket_type == "stream" else service.dgram
    module_name, colon, attribute = spec.partition(":")
    if not colon:
        raise ValueError(f"unknown handler {spec!r}: expected {HANDLER_FORMS}")
    if not _dotted(module_name) or not _dotted(attribute):
        raise ValueError(f'{spec!r} is not of the form "package.module:Class"')
    try:
        module = import_module(module_name)
    except (Exception, SystemExit) as exc:  # whatever the module's top level raises
        raise ValueError(f"cannot import module {module_name!r}: {_describe(exc)}") from None
    handler: object = module
    walked: list[str] = []
    for name in attribute.split("."):
        walked.append(name)
        try:
            handler = getattr(handler, name)
        except AttributeError:
            where = f"module {module_name!r} has no attribute {'.'.join(walked)!r}"
            raise ValueError(f"cannot find {spec!r}: {where}") from None
        except Exception as exc:  # a module __getattr__ or a property may raise anything
            raise ValueError(f"cannot get {spec!r}: {_describe(exc)}") from None
    if not isinstance(handler, type):
        raise ValueError(f"{spec!r} is not a class, it is {_a(type(handler).__name__)}")
    if not issubclass(handler, HANDLER_BASES):
        raise ValueError(
            f"{spec!r} is not a request handler: it must derive from "
            "socketserver.BaseRequestHandler (or servers.BaseRequestHandler)"
        )
    if socket_type == "stream" and issubclass(handler, DATAGRAM_BASES):
        raise ValueError(f'{spec!r} is a DatagramRequestHandler: it needs socket_type = "dgram"')
    if socket_type == "dgram" and issubclass(handler, STREAM_BASES):
        raise ValueError(f'{spec!r} is a StreamRequestHandler: it needs socket_type = "stream"')
    return handler


def _dotted(name: str) -> bool:
    # Identifiers only: import_module() would treat a leading "." as relative, and raise
    # TypeError rather than ImportError for it.
    return all(part.isidentifier() for part in name.split("."))


def _describe(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # an exception class with a broken __str__
        detail = ""
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


# -- commands --------------------------------------------------------------------------------

COMMAND_FORM: Final = 'a list: the program and its arguments, like ["/usr/sbin/in.tftpd", "-s"]'
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def command(value: Any) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, as a tuple."""
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be {COMMAND_FORM}, got {show(value)}")
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            problems.append((f"[{i}]", f"must be a non-empty string, got {show(item)}"))
        elif "\0" in item:
            problems.append((f"[{i}]", f"must not contain a NUL character, got {show(item)}"))
    if problems:
        raise Invalid.many(problems)
    return tuple(value)


def environment(value: Any) -> MappingProxyType[str, str]:
    """A table of variable name -> string value, read-only."""
    if not isinstance(value, dict):
        raise Invalid(f'must be a table of strings like {{ TZ = "UTC" }}, got {show(value)}')
    problems: list[tuple[str, str]] = []
    for name, item in value.items():
        where = f".{quote_key(name)}"
        if not name or "=" in name or "\0" in name:
            problems.append((where, "a variable name must be non-empty, without '=' or NUL"))
        elif not isinstance(item, str):
            problems.append((where, f"must be a string, got {show(item)}"))
        elif "\0" in item:
            problems.append((where, f"must not contain a NUL character, got {show(item)}"))
    if problems:
        raise Invalid.many(problems)
    return MappingProxyType(dict(value))


def env_names(value: Any) -> tuple[str, ...]:
    """A list of environment variable names ([A-Za-z_][A-Za-z0-9_]*), as a tuple."""
    if not isinstance(value, list):
        raise Invalid(f'must be a list of variable names like ["LANG", "TZ"], got {show(value)}')
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not ENV_NAME.fullmatch(item):
            message = f"must be a variable name ([A-Za-z_][A-Za-z0-9_]*), got {show(item)}"
            problems.append((f"[{i}]", message))
    if problems:
        raise Invalid.many(problems)
    return tuple(value)


def account_name(value: Any) -> str:
    """A user or group name (or number, as a string); whether it exists is checked at startup."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, got {show(value)}")
    if "\0" in value:
        raise Invalid(f"must not contain a NUL character, got {show(value)}")
    return value


# -- sizes in bytes --------------------------------------------------------------------------

MIB: Final = 1 << 20
UNITS: Final = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
BYTES = re.compile(r"([0-9]{1,20}) ?([KMGTkmgt]?)(i?B)?")
BYTES_FORM: Final = 'an integer number of bytes, or a string like "512MiB", "1GiB" or "200M"'


def byte_size(value: Any) -> int:
    """Bytes, at least 1 MiB: an integer, or a string with a binary unit ("200MiB", "512M",
    "1G", "4096KiB"; K, M, G, T with an optional "iB" or "B")."""
    if isinstance(value, str):
        match = BYTES.fullmatch(value)
        # A bare number in a string, or "iB" with no unit letter, is more likely a slip than
        # meant: only a unit makes a string.
        if match is None or (not match[2] and match[3] != "B"):
            raise Invalid(f"must be {BYTES_FORM}, got {show(value)}")
        size = int(match[1]) << UNITS[match[2].upper()]
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise Invalid(f"must be {BYTES_FORM}, got {show(value)}")
    if size < MIB:
        raise Invalid(f"must be at least 1 MiB (1048576 bytes), got {show(value)}")
    if size > INT64_MAX:
        raise Invalid(f"must be at most {INT64_MAX} bytes, got {show(value)}")
    return size


def format_bytes(size: int) -> str | int:
    """A size as byte_size() reads it back: "200MiB" when a unit divides it, else the integer."""
    for unit in ("T", "G", "M", "K"):
        shift = UNITS[unit]
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}iB"
    return size
