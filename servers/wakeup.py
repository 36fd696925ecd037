"""A self-pipe that wakes a thread blocked in select() from any other thread.

serve_forever() blocks in its selector with no timeout, so an idle server costs no wake-ups at all.
shutdown() needs a way in: it writes one byte here, and the selector sees the read end become ready.
A socketpair (not a pipe) because both ends can be non-blocking with one call, and a full buffer
simply means a wake-up is already pending, so the write may be dropped.
"""

from __future__ import annotations

import socket


class Wakeup:
    """Write end for any thread, read end for the selector.

    Methods for the caller:

    - fileno() -> int: register this for EVENT_READ.
    - wake(): make fileno() readable; safe from any thread, never blocks.
    - drain(): consume pending wake-ups; call when fileno() was ready.
    - close()
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the buffer is full: a wake-up is pending already
        except OSError:
            pass  # closed under us by a racing close(): the loop is gone, nothing to wake

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
