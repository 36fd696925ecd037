"""Servers under test: the Target abstraction and the stdlib peers run as subprocesses.

Usage:

    target = PeerTarget("ThreadingTCPServer", "threading", ports)
    if (reason := target.unavailable()) is None:
        running = target.start()          # raises TargetUnavailable if it does not come up
        try:
            ...                           # load running.port, measure ProcessTree(running.pid)
        finally:
            target.stop()

A target is started afresh for every repeat, in its own session (process group) and temporary
directory, so stop() can end it with everything it forked and leave nothing behind.

Methods that may be overridden (ProcessTarget): command() (required), env(), cwd().
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cpus import children_on
from .ports import NotAccepting, PortAllocator, wait_accepting
from .proctree import terminate_tree

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = SCRIPTS_DIR.parent

# How long a server may take from exec to accepting on every port before it is skipped.
STARTUP_TIMEOUT = 10.0

# Kinds of target, for pairing each selectd figure with each peer's, and each twin's with
# its original's (PeerTarget.twin()).
SELECTD = "selectd"
PEER = "peer"
TWIN = "twin"


class TargetUnavailable(Exception):
    """The target cannot run here; the message is the note printed in the report."""


@dataclass(frozen=True)
class Running:
    """A started target: the ports it serves and the root process to measure (with children)."""

    ports: tuple[int, ...]
    pid: int
    startup_s: float  # from exec to every port accepting

    @property
    def port(self) -> int:
        return self.ports[0]


class Target(ABC):
    """Something that serves the echo on loopback and can be started and stopped.

    Class variables: kind (SELECTD, PEER or TWIN); max_source_addrs (a cap on conn mode's -s,
    or None). Methods for the caller: unavailable(), start(), stop().
    """

    kind: str = PEER
    # A TWIN's original: the peer it is a second copy of.
    twin_of: str | None = None
    # At most this many conn-mode source addresses (see loadgen.py DEFAULT_SOURCE_ADDRS).
    max_source_addrs: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None when it can."""
        return None

    @abstractmethod
    def start(self) -> Running:
        """Start serving; return once every port accepts. Raises TargetUnavailable."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the target and everything it started; safe to call when not running."""


class ProcessTarget(Target):
    """A target that is one command, serving on ports this class picks for it."""

    def __init__(
        self, name: str, ports: PortAllocator, *, nports: int = 1, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(name)
        self.allocator = ports
        self.nports = nports
        self.host = host
        self.popen: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        # --pin: the CPUs the server, and everything it forks, runs on; None: any we may use.
        self.cpus: frozenset[int] | None = None

    @abstractmethod
    def command(self, workdir: Path, ports: Sequence[int]) -> list[str]:
        """The argv that serves the echo on ports; may write config files into workdir."""

    def env(self) -> dict[str, str] | None:
        """The environment for the command (None: inherit ours)."""
        return None

    def cwd(self) -> Path | None:
        return None

    def start(self) -> Running:
        ports = self.allocator.block(self.nports)
        self.workdir = Path(tempfile.mkdtemp(prefix="selectd-bench-"))
        argv = self.command(self.workdir, ports)
        with open(self.workdir / "stderr", "wb") as stderr, children_on(self.cpus):
            started = time.monotonic()
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.cwd(),
                env=self.env(),
                start_new_session=True,  # its own process group, so stop() reaches its children
            )
        try:
            wait_accepting(self.host, ports, STARTUP_TIMEOUT, self.popen)
        except NotAccepting as exc:
            tail = self._stderr_tail()
            self.stop()
            raise TargetUnavailable(f"{exc}{': ' + tail if tail else ''}") from None
        return Running(ports, self.popen.pid, time.monotonic() - started)

    def stop(self) -> None:
        if self.popen is not None:
            leftover = terminate_tree(self.popen)
            self.popen = None
            if leftover:
                print(f"warning: {self.name}: processes still running: {leftover}", file=sys.stderr)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _stderr_tail(self, lines: int = 5) -> str:
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / "stderr").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def python_env(*paths: Path) -> dict[str, str]:
    """Our environment with paths put first on PYTHONPATH."""
    env = dict(os.environ)
    entries = [str(p) for p in paths]
    if env.get("PYTHONPATH"):
        entries.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(entries)
    return env


class PeerTarget(ProcessTarget):
    """A peer from bench.peers: "threading", "forking", "asyncio", "uvloop" or "threading-many".

    With "threading-many", nports ThreadingTCPServers run in one process (the scale section).
    """

    def __init__(self, name: str, peer: str, ports: PortAllocator, *, nports: int = 1) -> None:
        super().__init__(name, ports, nports=nports)
        self.peer = peer

    def twin(self) -> PeerTarget:
        """A second copy of this peer, run beside it: the ratio of two identical servers is how
        far this machine lets a ratio stray from 1 (report.py pairs the two)."""
        twin = PeerTarget(f"{self.name}-twin", self.peer, self.allocator, nports=self.nports)
        twin.kind, twin.twin_of = TWIN, self.name
        return twin

    def unavailable(self) -> str | None:
        # The peer runs on this interpreter (sys.executable), so what we can import, it can.
        if self.peer == "uvloop" and importlib.util.find_spec("uvloop") is None:
            return "uvloop is not installed (pip install -e '.[bench]')"
        return None

    def command(self, workdir: Path, ports: Sequence[int]) -> list[str]:
        argv = [sys.executable, "-m", "bench.peers", self.peer, self.host, str(ports[0])]
        if self.peer == "threading-many":
            argv.append(str(len(ports)))
        return argv

    def env(self) -> dict[str, str]:
        return python_env(SCRIPTS_DIR)
