"""The pidfile: written atomically once the daemon is up, removed on a clean exit (rewritten in
place and emptied instead, by a daemon that dropped root and may not create or remove files in
the pidfile's directory).

A pidfile naming a live selectd is an error (two daemons would fight over the same ports); one
naming a dead process, or a process that is not selectd, is stale and replaced. During an upgrade
the new daemon takes the file over from the old one, which then leaves it alone when it exits.
"""

from __future__ import annotations

import os
import tempfile

import psutil

from .errors import DaemonError


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        raise DaemonError(f"pidfile {path}: {exc.strerror or exc}") from exc
    return int(text) if text.isdigit() else None


def is_selectd(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return proc.is_running() and ("selectd" in cmdline or "-m daemon" in cmdline)


def check(path: str, taking_over_from: int | None = None) -> None:
    """Refuse to start when the pidfile names another live selectd."""
    pid = read_pid(path)
    if pid is None or pid == os.getpid() or pid == taking_over_from:
        return
    if is_selectd(pid):
        raise DaemonError(f"pidfile {path}: selectd is already running as pid {pid}")


def write(path: str) -> None:
    """Write our pid: a temporary file in the same directory, renamed over the old one.

    A daemon that has dropped root may not create files in the pidfile's directory (a
    RuntimeDirectory systemd made for a root service); it then rewrites the file in place,
    which the daemon that wrote it first handed to the user it became (supervisor.py).
    """
    directory = os.path.dirname(path) or "."
    try:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".selectd-pid.", dir=directory)
        except PermissionError:
            if not os.path.exists(path):
                raise
            _rewrite(path, f"{os.getpid()}\n")
            return
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise DaemonError(f"cannot write pidfile {path}: {exc.strerror or exc}") from exc


def _rewrite(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def remove(path: str) -> str | None:
    """Remove the pidfile if it still names us (after an upgrade it names the successor); where
    the directory does not let us (after a privilege drop), empty it: a pidfile naming no one.

    Never raises: at exit, a pidfile that cannot be removed is a thing to report, not a reason
    to fail. Returns what went wrong, if anything.
    """
    try:
        if read_pid(path) != os.getpid():
            return None
        try:
            os.unlink(path)
        except PermissionError:
            _rewrite(path, "")
    except (OSError, DaemonError) as exc:
        return str(exc)
    return None
