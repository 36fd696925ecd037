"""Resolve a server's `handler` setting to its request handler class.

A handler is a built-in service name (servers.services.BUILTIN_SERVICES) or
"package.module:Class", where Class may be a dotted path ("mod:Outer.Inner"). The class must
derive from the BaseRequestHandler of `servers` or of the stdlib's socketserver: selectd runs
stdlib handlers unchanged.

Every failure is a ValueError with a one-line message, never a traceback: config checking reports
it against the key path, and `selectd check` is where an operator finds a broken import.
"""

from __future__ import annotations

import socketserver
from importlib import import_module

import servers
from servers.services import BUILTIN_SERVICES

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
