"""Dropping root: bind everything first, then become [daemon] user and group for good.

The order is setgroups, setgid, setuid: once the uid is gone the groups can no longer be changed.
The drop is verified by trying to get root back, which must fail; a daemon that could regain root
after claiming to have dropped it is a security bug, so that is a fatal error.

Linux makes a process that changed its uid undumpable, and with it every fork worker it forks
later: then not even the daemon may read a worker's /proc (which syscall its handler is blocked
in, what the `timeout` watchdog asks), and none of them leaves a core dump. Once the drop holds,
the daemon makes itself dumpable again, as nginx does for its workers after setuid(): only
processes of the same (dropped) user, or root, can then look in.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

from .errors import DaemonError

_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    home: str


def resolve(user: str | None, group: str | None, table: str = "daemon") -> Identity | None:
    """The identity to drop to, or None; DaemonError naming the key (`table`.user or .group)
    when it does not exist."""
    if user is None and group is None:
        return None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise DaemonError(f"{table}.user: no such user {user!r}") from None
        uid, gid, home, name = entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_name
    else:
        uid, gid, home, name = os.getuid(), os.getgid(), "/", str(os.getuid())
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"{table}.group: no such group {group!r}") from None
    return Identity(name, uid, gid, home)


def drop(identity: Identity) -> None:
    """Become `identity` for good; DaemonError if not root or if the drop did not take."""
    if os.getuid() == identity.uid and os.getgid() == identity.gid:
        return
    if os.geteuid() != 0:
        raise DaemonError(
            f"daemon.user/group: switching to {identity.user} needs root; running as uid "
            f"{os.geteuid()}"
        )
    try:
        os.setgroups([identity.gid])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise DaemonError(f"cannot switch to user {identity.user}: {exc.strerror}") from exc
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise DaemonError("dropped privileges could be regained: refusing to run")
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (
        identity.uid,
        identity.uid,
        identity.gid,
        identity.gid,
    ):
        raise DaemonError(f"switching to user {identity.user} did not take")
    os.environ["HOME"] = identity.home
    os.environ["USER"] = os.environ["LOGNAME"] = identity.user
    _make_dumpable()


def _make_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 1), if this libc has it (see the module docstring)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: nothing was taken away
