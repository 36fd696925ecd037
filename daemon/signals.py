"""Signals as bytes on a socket the selector watches.

Signal handlers do nothing at all: `signal.set_wakeup_fd` has the C-level handler write the signal
number to a non-blocking socket, and the supervisor's loop reads the numbers and acts on them on
its own time. Nothing is logged, forked or locked inside a handler. The buffer is drained on every
readiness; if it ever filled, signals of one kind coalesce, which is harmless for the ones we use
(SIGCHLD means "reap until none is left", a repeated SIGTERM means what one does).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable


def _record_only(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup fd has already recorded the signal."""


class SignalWakeup:
    """Route `signals` to a socket; read them back with `pending()`.

    Methods for the caller:

    - fileno() -> int: register for EVENT_READ.
    - pending() -> list[int]: the signal numbers received since the last call, in order.
    - close(): restore the previous handlers and wakeup fd.
    """

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _record_only) for sig in signals}
        # Keep slow system calls (a handler's blocking recv in a worker thread) from failing
        # with EINTR; Python retries them anyway (PEP 475), this just saves the round trip.
        for sig in self._previous:
            signal.siginterrupt(sig, False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def pending(self) -> list[int]:
        received = bytearray()
        while True:
            try:
                chunk = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            received += chunk
        return list(received)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()

    def close_in_child(self) -> None:
        """In a forked child: stop routing signals here and release the sockets."""
        signal.set_wakeup_fd(-1)
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)
        self._reader.close()
        self._writer.close()
