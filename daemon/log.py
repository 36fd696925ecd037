"""Structured logging for the daemon: structlog, JSON lines or a readable console.

Every event is one line: `event`, `level`, `timestamp`, `pid`, plus the fields of the call
(`server`, `client`, ...). Events below the configured level cost one method call that returns at
once: make_filtering_bound_logger builds no-op methods for them, so the hot path pays nothing.

The `servers` package logs through the stdlib's logging module; a small handler forwards those
records into the same structlog pipeline, so the whole process speaks one format.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _add_pid(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("pid", os.getpid())
    return event


def resolve_format(fmt: str, stream: TextIO) -> str:
    """'auto' means console on a terminal, json otherwise (under systemd, in files, in tests)."""
    if fmt != "auto":
        return fmt
    return "console" if stream.isatty() else "json"


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog (and the stdlib bridge) for this process.

    Call again in a forked child, on fresh_stdio()'s stream: structlog keeps one write lock per
    file object, so loggers on a new file object get a lock the fork cannot have caught held.
    """
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    sink = _Sink(stream)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
    ]
    renderer: list[Any]
    if fmt == "json":
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    bridge = logging.getLogger("servers")
    bridge.handlers[:] = [_StructlogBridge()]
    bridge.setLevel(LEVELS[level])
    bridge.propagate = False
    warnings.showwarning = _show_warning


class _Sink:
    """The log stream as structlog writes to it: a line that cannot be written is dropped.

    structlog raises a failed write into whatever logged: the loop in the middle of replacing a
    dead fork worker, a pool thread reporting a handler's failure, a graceful stop. A log sink
    that goes away (a closed pipe to a log shipper, a hung-up terminal, a full disk) must cost
    the log lines, not the daemon.
    """

    __slots__ = ("__weakref__", "_stream")  # structlog keys its write lock by a weak reference

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def release_stdio() -> None:
    """Before the interpreter exits: flush stdout and stderr, and point one whose reader is
    gone at /dev/null, so that Python's own last flush cannot fail and turn a clean stop into
    exit status 120."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, stream.fileno())
                finally:
                    os.close(devnull)
            except (OSError, ValueError):
                pass


def line_buffered_stdout() -> None:
    """Make the daemon's stdout flush at every line, as its stderr does.

    Handlers run inline and in thread pools print to the daemon's own stdout, which under
    systemd is the journal's socket, not a terminal: block buffered, a line would wait for 8 KiB
    of others before the journal saw it.
    """
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


def fresh_stdio() -> TextIO:
    """In a forked child: new sys.stdout and sys.stderr objects on descriptors 1 and 2; returns
    the new sys.stderr, for configure().

    CPython does not reset a buffered file's lock in a forked child. Had another thread of the
    parent been inside a write to sys.stdout or sys.stderr at the moment of the fork (a thread
    pool's handler printing, or logging while journald pushes back), the child's first write
    through that object would wait for ever. New objects come with new locks, and whatever the
    old ones held unflushed stays the parent's to write.

    Both are line buffered, stdout too (a worker leaves by os._exit(), which flushes nothing),
    and unbuffered below the text layer when the daemon's are (python -u, PYTHONUNBUFFERED).
    """
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        unbuffered = bool(getattr(old, "write_through", False))
        try:
            binary = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115
        except OSError:
            continue  # no such descriptor: keep what there is
        new = io.TextIOWrapper(
            binary,
            encoding=getattr(old, "encoding", None),
            errors=getattr(old, "errors", None),
            line_buffering=True,
            write_through=unbuffered,
        )
        setattr(sys, name, new)
    return sys.stderr


class _StructlogBridge(logging.Handler):
    """Forward stdlib logging records (from servers/) into structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if "client_address" in record.__dict__:
            fields["client"] = format_address(record.__dict__["client_address"])
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        get_logger().log(record.levelno, record.getMessage(), **fields)


_stdlib_showwarning = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A Python warning that is shown (PYTHONWARNINGS, -W, a DeprecationWarning in __main__)
    as a `python_warning` event, where Python would print raw text among the JSON lines."""
    if file is not None:  # asked for on a file of the caller's: as the stdlib would
        _stdlib_showwarning(message, category, filename, lineno, file, line)
        return
    get_logger().warning(
        "python_warning",
        category=category.__name__,
        message=str(message),
        source=f"{filename}:{lineno}",
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


def format_address(address: Any) -> str:
    """A client or server address as one string: '127.0.0.1:5000', '[::1]:5000', a path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    if isinstance(address, str) and address.startswith("\0"):
        return "@" + address[1:]
    return str(address) if address else "unix:unnamed"
