"""Loopback ports for the servers under test, and waiting until they accept.

Usage:

    ports = PortAllocator()
    first_block = ports.block(1)       # (p,)
    many = ports.block(1000)           # 1000 consecutive free ports
    wait_accepting("127.0.0.1", many, timeout=10.0, process=popen)

Ports come from below the kernel's ephemeral range, so they never collide with the source ports
the load generator's connections use, and every target gets ports no earlier target used, so no
late packet or TIME_WAIT from one run can reach the next.
"""

from __future__ import annotations

import errno
import random
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

# Used when /proc does not say where the ephemeral range starts.
_DEFAULT_EPHEMERAL_LOW = 32768
# Keep clear of the well-known and commonly configured ports.
_LOWEST_PORT = 10000
# Between connection attempts while a server starts: a foreign process gives no readiness event,
# so there is nothing to wait on but the port itself.
_PROBE_INTERVAL = 0.005


class NotAccepting(Exception):
    """A server did not accept on all its ports in time (the message says why)."""


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def _is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            # No SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken too.
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class PortAllocator:
    """Hands out blocks of consecutive free ports, each block above the previous one."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.limit = _ephemeral_low()
        # A random start, so two benchmark runs side by side are unlikely to race for one port.
        self.next = random.randrange(_LOWEST_PORT, max(_LOWEST_PORT + 1, self.limit // 2))

    def block(self, count: int) -> tuple[int, ...]:
        """count consecutive ports that are free now (a server should bind them soon)."""
        start = self.next
        while start + count <= self.limit:
            block = range(start, start + count)
            taken = next((p for p in block if not _is_free(self.host, p)), None)
            if taken is None:
                self.next = start + count
                return tuple(range(start, start + count))
            start = taken + 1
        if self.next != _LOWEST_PORT:  # wrapped: try once more from the bottom
            self.next = _LOWEST_PORT
            return self.block(count)
        raise RuntimeError(f"no {count} consecutive free ports below {self.limit}")


def wait_accepting(
    host: str,
    ports: Sequence[int],
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
) -> float:
    """Wait until every port accepts a connection; return the seconds it took.

    Raises NotAccepting when the deadline passes or process exits first.
    """
    started = time.monotonic()
    deadline = started + timeout
    for port in ports:
        while True:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    break
            except OSError as exc:
                if process is not None and process.poll() is not None:
                    raise NotAccepting(
                        f"exited with status {process.returncode} before port {port} accepted"
                    ) from None
                if time.monotonic() > deadline:
                    raise NotAccepting(
                        f"port {port} not accepting after {timeout:.0f} s: {exc}"
                    ) from None
            time.sleep(_PROBE_INTERVAL)
    return time.monotonic() - started
