"""The one exception type that ends the daemon, and the exit statuses it carries.

Exit statuses are a protocol with the init system and the operator: 0 after a graceful stop, 1 for
a fatal runtime error (a listener that cannot be bound, a failed startup), 2 for a usage or config
error. Anything the CLI catches is turned into one line on stderr and one of these statuses.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    RUNTIME = 1
    USAGE = 2


class DaemonError(Exception):
    """A fatal error with a message for the operator and the exit status it implies."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.RUNTIME) -> None:
        super().__init__(message)
        self.status = status
