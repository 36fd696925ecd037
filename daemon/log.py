"""Structured logging for the daemon: structlog, JSON lines or a readable console.

Every event is one line: `event`, `level`, `timestamp`, `pid`, plus the fields of the call
(`server`, `client`, ...). Events below the configured level cost one method call that returns at
once: make_filtering_bound_logger builds no-op methods for them, so the hot path pays nothing.

The `servers` package logs through the stdlib's logging module; a small handler forwards those
records into the same structlog pipeline, so the whole process speaks one format.

In the daemon's own process, nothing that logs ever waits for stderr (start_background()): a
line is written at once when the sink takes it, and when a sink stops reading (a hung journald,
a paused terminal, a log shipper that stalls) what it would not take waits for a writer thread
instead of the loop or a pool thread. Up to PENDING_LIMIT bytes wait; past that, lines are
dropped and counted, and a `log_lines_dropped` event says how many once the sink takes lines
again. Forked children (fork workers, exec and upgrade children) write for themselves: a stall
there holds up one request at most.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
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


# How many bytes of log lines may wait for a sink that does not keep up before lines drop.
PENDING_LIMIT = 1 << 20
# How long release_stdio() waits for the writer thread to hand the sink what is pending.
DRAIN_TIMEOUT = 5.0


class _Background:
    """Writes that never block the caller, and a thread for what the sink would not take yet.

    A line is written at once, by whoever logs it, without waiting: a send with MSG_DONTWAIT
    where stderr is a socket (the journal's), else a write on a second, non-blocking open of
    the same pipe or terminal (its own file description, so that the O_NONBLOCK flag never
    reaches the shell or the other processes that share stderr). What the sink does not take
    then waits, in order, for the writer thread, which blocks on the sink instead; while any
    waits, later lines queue behind it. The thread starts with the first line the sink does
    not take: while the sink keeps up, the daemon runs no thread for it (and forks its workers
    from a process with no other thread).
    """

    def __init__(
        self, fd: int, out: int, sock: socket.socket | None, encoding: str, errors: str
    ) -> None:
        self.fd = fd  # the stream's descriptor, which sinks are matched by
        self._out = out  # the descriptor written: the second open, or the socket's dup
        self._sock = sock
        self._encoding, self._errors = encoding, errors
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[bytes] = []
        self._size = 0
        self._dropped = 0
        self._writing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, stream: TextIO) -> _Background | None:
        """For a stream on a socket, pipe or terminal; None for anything else (a regular file
        never makes a writer wait for a reader) or when the second open is refused."""
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
            sock = None
            if stat.S_ISSOCK(mode):
                sock = socket.socket(fileno=os.dup(fd))
                out = sock.fileno()
            elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                out = os.open(f"/proc/self/fd/{fd}", flags)
            else:
                return None
        except (AttributeError, OSError, ValueError):
            return None  # not a descriptor (a test's StringIO), or no second open: write as before
        encoding = getattr(stream, "encoding", None) or "utf-8"
        errors = getattr(stream, "errors", None) or "strict"
        return cls(fd, out, sock, encoding, errors)

    def put(self, text: str) -> int:
        data = self._encode(text)
        with self._cond:
            if not self._pending and not self._writing:
                try:
                    written = self._write_now(data)
                except OSError:
                    return 0  # the sink is gone: the line is lost, as _Sink loses it
                if written == len(data):
                    return len(text)
                data = data[written:]
            elif self._size + len(data) > PENDING_LIMIT:
                self._dropped += 1
                return 0
            self._pending.append(data)
            self._size += len(data)
            if self._thread is None:
                self._start_writer()
            self._cond.notify()
        return len(text)

    def _start_writer(self) -> None:
        thread = threading.Thread(target=self._run, name="selectd-log", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            return  # no thread to be had now: the line waits, and the next one tries again
        self._thread = thread

    def drain(self, timeout: float) -> bool:
        """Wait until every pending line is written (or given up on); False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _write_now(self, data: bytes) -> int:
        """Write what the sink takes without waiting; raises OSError but for a full sink."""
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self._out, data)
        except BlockingIOError:
            return 0

    def _run(self) -> None:
        _name_this_thread(b"selectd-log")
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                data = b"".join(self._pending)
                self._pending.clear()
                self._size = 0
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            try:
                self._write_all(data)
                if dropped:  # queued (we are still writing) behind the lines it followed
                    get_logger().warning("log_lines_dropped", lines=dropped)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                select.select([], [self._out], [], None)
                view = view[self._write_now(view) :]
            except (OSError, ValueError):
                return  # the sink is gone: these lines are lost, as a closed pipe loses them

    def _encode(self, text: str) -> bytes:
        try:
            return text.encode(self._encoding, self._errors)
        except (UnicodeError, LookupError):  # a strict stream: never lose a line over it
            return text.encode("utf-8", "backslashreplace")


def _find_prctl() -> Any:
    # Looked up once, at import: a thread that called dlopen() itself could be holding the
    # loader's lock at the moment another thread forks, and the child's next dlopen() (a
    # handler importing an extension module) would wait for ever.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()
_PR_SET_NAME = 15


def _name_this_thread(name: bytes) -> None:
    """Set the calling thread's name as `top -H`, `ps -L` and /proc/PID/task/TID/comm show it."""
    if _PRCTL is not None:  # a name is a courtesy
        _PRCTL(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


_background: _Background | None = None


def start_background(stream: TextIO | None = None) -> None:
    """In the daemon's own process: from now on, the loggers configure() sets up on `stream`
    (sys.stderr) write without ever waiting on it (see _Background)."""
    global _background
    stream = stream or sys.stderr
    if _background is None:  # a forked child has none (_forget_background)
        stream.flush()
        _background = _Background.open(stream)


def _forget_background() -> None:
    # In a forked child the writer thread does not exist, and its lock may be held for ever.
    global _background
    _background = None


os.register_at_fork(after_in_child=_forget_background)


class _Sink:
    """The log stream as structlog writes to it: a line that cannot be written is dropped.

    structlog raises a failed write into whatever logged: the loop in the middle of replacing a
    dead fork worker, a pool thread reporting a handler's failure, a graceful stop. A log sink
    that goes away (a closed pipe to a log shipper, a hung-up terminal, a full disk) must cost
    the log lines, not the daemon. Where start_background() set up writes that never wait for
    this stream's descriptor, a line goes that way, so that a sink that stops reading costs the
    lines past PENDING_LIMIT, not a stalled loop.
    """

    # structlog keys its write lock by a weak reference
    __slots__ = ("__weakref__", "_fd", "_stream")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None

    def write(self, text: str) -> int:
        background = _background
        if background is not None and background.fd == self._fd:
            return background.put(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            return 0

    def flush(self) -> None:
        background = _background
        if background is not None and background.fd == self._fd:
            return  # written unbuffered, by put() or the writer thread
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def drain(timeout: float = DRAIN_TIMEOUT) -> bool:
    """Wait (up to `timeout`) until the writer thread has handed the sink every line logged so
    far, as before text written to stderr directly should follow them; False if it could not."""
    background = _background
    return True if background is None else background.drain(timeout)


def release_stdio() -> None:
    """Before the interpreter exits: let the log's writer thread write what is pending (for up
    to DRAIN_TIMEOUT: a sink that has stopped reading must not keep the daemon from exiting),
    flush stdout and stderr, and point one whose reader is gone at /dev/null, so that Python's
    own last flush cannot fail and turn a clean stop into exit status 120."""
    drain()
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
