"""Shared fixtures: free loopback ports and a real selectd process to test against."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from daemon.listeners import (
    BPF_JEQ_K,
    BPF_LDB_ABS,
    BPF_RET_K,
    TCP_ACK,
    TCP_FLAGS_OFFSET,
    BpfProgram,
)

REPO = Path(__file__).resolve().parent.parent

# A socket filter (daemon.listeners.attach_socket_filter) that drops segments whose flags are
# exactly ACK: the bare ACK that ends a handshake. A client of a listener with it is connected
# on its side, and stays half done on the listener's until its first data segment (ACK|PSH)
# completes the handshake.
HOLD_HANDSHAKES: BpfProgram = (
    (BPF_LDB_ABS, 0, 0, TCP_FLAGS_OFFSET),
    (BPF_JEQ_K, 0, 1, TCP_ACK),
    (BPF_RET_K, 0, 0, 0),
    (BPF_RET_K, 0, 0, 0xFFFFFFFF),
)


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def running_with(marker: str) -> list[int]:
    """Processes running with `marker` (a daemon's config path) among their arguments."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if marker in (p.info["cmdline"] or []):
            found.append(p.info["pid"])
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class Daemon:
    """A selectd process started from a TOML text, with its JSON log lines at hand.

    With `prelude` (Python source, `os` and `sys` imported), a tiny wrapper runs it and then
    execs the daemon, so that the daemon's command line (and sys.orig_argv, which an upgrade
    re-executes) is the usual one. `pass_fds` are kept open for it.
    """

    def __init__(
        self,
        tmp_path: Path,
        config: str,
        args: tuple[str, ...] = (),
        path: str = "",
        prelude: str = "",
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.dir = tmp_path
        self.config_path = tmp_path / "selectd.toml"
        self.config_path.write_text(config)
        try:
            daemon_table = tomllib.loads(config).get("daemon", {})
        except tomllib.TOMLDecodeError:
            daemon_table = {}
        self.control_socket = str(daemon_table.get("control_socket", ""))
        self.log_path = tmp_path / "selectd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        pythonpath = [p for p in (path, str(REPO), os.environ.get("PYTHONPATH", "")) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
        env.pop("SELECTD_CONFIG", None)
        argv = ["-m", "daemon", "run", "-c", str(self.config_path), *args]
        if prelude:
            execute = "os.execvp(sys.executable, [sys.executable, *sys.argv[1:]])"
            argv = ["-c", f"import os, sys\n{prelude}\n{execute}", *argv]
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self._seen = 0

    def events(self) -> list[dict[str, Any]]:
        """Every JSON event logged so far (non-JSON lines are kept as {'raw': line})."""
        out = []
        for line in self.log_path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                value = {"raw": line}
            out.append(value if isinstance(value, dict) else {"raw": line})
        return out

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_event(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        def seen() -> Any:
            found = self.find(event, **fields)
            if not found and self.proc.poll() is not None:
                raise AssertionError(
                    f"selectd exited {self.proc.returncode} before {event}: {self.log_text()}"
                )
            return found[-1] if found else None

        return wait_for(seen, timeout)

    def control(self, command: str, **args: Any) -> dict[str, Any]:
        """One request on the control socket; the reply object."""
        return control_request(self.control_socket, command, **args)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the control socket answers ping (at any log level)."""

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"selectd exited {self.proc.returncode}: {self.log_text()}")
            try:
                return self.control("ping").get("result") == "pong"
            except (OSError, ValueError):
                return False

        wait_for(answers, timeout, interval=0.02)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def strays(self) -> list[int]:
        """Processes still running this daemon's command line (forked workers carry it)."""
        return [pid for pid in running_with(str(self.config_path)) if pid != self.pid]

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.send(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        children = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(config_text, ready=True) -> Daemon.

    tmp_path is on the daemon's PYTHONPATH, for handler modules a test writes there. Every daemon
    is killed at teardown, and the test fails if one left a process behind after its own exit.
    """
    started: list[Daemon] = []

    def start(config: str, ready: bool = True, args: tuple[str, ...] = (), **how: Any) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        daemon = Daemon(sub, config, args, path=str(tmp_path), **how)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield start
    leaked = []
    for daemon in started:
        if daemon.proc.poll() is not None:
            # Workers notice their supervisor is gone (EOF on their channel) and exit at once.
            deadline = time.monotonic() + 5
            while daemon.strays() and time.monotonic() < deadline:
                time.sleep(0.05)
            leaked += daemon.strays()
        daemon.close()
    assert not leaked, f"processes outlived their daemon: {leaked}"


def socket_activation(sockets: Sequence[tuple[str, socket.socket]]) -> dict[str, Any]:
    """start_daemon()/Daemon keywords that hand `sockets` (name, socket) to the daemon as
    systemd's socket activation does: from descriptor 3 on, with LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID (the daemon's own pid, which only a wrapper in that process can know)."""
    fds = [sock.fileno() for _, sock in sockets]
    names = ":".join(name for name, _ in sockets)
    prelude = (
        "import fcntl\n"
        # Out of the way first, so that no descriptor is overwritten before it is moved.
        f"high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in {fds!r}]\n"
        f"for fd in {fds!r}: os.close(fd)\n"
        "for i, fd in enumerate(high): os.dup2(fd, 3 + i); os.close(fd)\n"
        f"os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='{len(fds)}', "
        f"LISTEN_FDNAMES='{names}')"
    )
    return {"prelude": prelude, "pass_fds": fds}


def control_request(path: str, command: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request on the control socket at `path`; the reply object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def daemon_section(tmp_path: Path, **extra: Any) -> str:
    """A [daemon] table for tests: a private control socket, JSON logs at debug level; `extra`
    adds or overrides keys."""
    keys: dict[str, Any] = {
        "control_socket": f"{tmp_path}/control.sock",
        "log_format": "json",
        "log_level": "debug",
        **extra,
    }
    return tomli_w.dumps({"daemon": keys})


def echo_roundtrip(port: int, payload: bytes = b"hello\n", host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (a denied client): what it sent is still readable
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)
