"""systemd glue: the notify protocol and socket activation. No dependency needed.

Notify (sd_notify(3)): when $NOTIFY_SOCKET is set (a path, or '@name' for the abstract
namespace), state changes are sent there as one datagram of KEY=VALUE lines: READY=1,
RELOADING=1 with MONOTONIC_USEC, STOPPING=1, WATCHDOG=1, STATUS=..., MAINPID=.... Without it
every call is a no-op, so the daemon calls them unconditionally.

Socket activation (sd_listen_fds(3)): when $LISTEN_PID is our pid, descriptors 3 ..
3 + $LISTEN_FDS - 1 are listening sockets handed to us, named by $LISTEN_FDNAMES (colon
separated). The variables are unset once read, so children do not take them for theirs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3


class Notifier:
    """Send sd_notify messages; every method is a no-op when not under a notify socket."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            path = "\0" + path[1:]
        self.address = path or None
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        ours = not watchdog_pid or watchdog_pid == str(os.getpid())
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and ours else 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> None:
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(message, self.address)
        except OSError:
            pass  # the manager went away or is not reading: nothing useful to do about it

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def mainpid(self, pid: int) -> None:
        self.send(MAINPID=pid)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The sockets passed to us, by name; {} when none were. Unsets the variables."""
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", "")
    count = env.pop("LISTEN_FDS", "")
    names_text = env.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    n = int(count)
    names = names_text.split(":") if names_text else []
    sockets: dict[str, socket.socket] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        if name in sockets:
            name = f"{name}.{i}"
        sockets[name] = socket.socket(fileno=fd)
    return sockets
