"""selectd as a system service: notify protocol, pidfile, privilege drop, upgrade, worker health."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from daemon import pidfile
from tests.conftest import (
    REPO,
    Daemon,
    control_request,
    daemon_section,
    echo_roundtrip,
    free_port,
    wait_for,
)

HANDLERS = """
import os
import socketserver
import time


class WhoAmI(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(f"{os.getuid()} {os.geteuid()} {os.getpid()}\\n".encode())


class Hang(socketserver.StreamRequestHandler):
    def handle(self):
        if self.rfile.readline().startswith(b"hang"):
            time.sleep(3600)
        self.wfile.write(f"{os.getpid()}\\n".encode())


class Grow(socketserver.StreamRequestHandler):
    hoard = []

    def handle(self):
        self.rfile.readline()
        Grow.hoard.append(bytearray(8 * 1024 * 1024))  # 8 MiB more each request, touched
        Grow.hoard[-1][::4096] = b"x" * len(Grow.hoard[-1][::4096])
        self.wfile.write(f"{os.getpid()}\\n".encode())
"""


@pytest.fixture
def handlers(tmp_path: Path) -> str:
    (tmp_path / "servicehandlers.py").write_text(HANDLERS)
    return "servicehandlers"


def server(name: str, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: keys}})


def ask(port: int, line: bytes = b"?\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        return s.makefile("rb").readline()


class NotifySocket:
    """A stand-in for systemd's notify socket: collects what the daemon sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self.cursor = 0  # wait() looks at messages from here on

    def collect(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def wait(self, key: str, value: str | None = None, timeout: float = 10) -> dict[str, str]:
        """The next message (after the last one wait() returned) that sets `key`."""

        def seen() -> dict[str, str] | None:
            messages = self.collect()
            for i in range(self.cursor, len(messages)):
                message = messages[i]
                if key in message and (value is None or message[key] == value):
                    self.cursor = i + 1
                    return message
            return None

        return wait_for(seen, timeout)

    def close(self) -> None:
        self.sock.close()


def start_with_env(tmp_path: Path, config: str, prelude: str = "", **env: str) -> Daemon:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        daemon = Daemon(tmp_path, config, path=str(tmp_path), prelude=prelude)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return daemon


# -- systemd notify --------------------------------------------------------------------------


def test_notify_ready_reloading_stopping_and_watchdog(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    port = free_port()
    config = daemon_section(tmp_path) + server("echo", listen=f"127.0.0.1:{port}", handler="echo")
    daemon = start_with_env(
        tmp_path, config, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000"
    )
    try:
        ready = notify.wait("READY", "1")
        assert "1/1 servers running" in ready["STATUS"]
        assert echo_roundtrip(port) == b"hello\n", "READY means every listener is bound"
        # WATCHDOG_USEC=200000: a ping every 0.1 s from the loop.
        before = sum(1 for m in notify.collect() if "WATCHDOG" in m)
        time.sleep(0.5)
        assert sum(1 for m in notify.collect() if "WATCHDOG" in m) - before >= 3
        daemon.send(signal.SIGHUP)
        reloading = notify.wait("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait("READY", "1")
        daemon.send(signal.SIGTERM)
        notify.wait("STOPPING", "1")
        assert daemon.proc.wait(10) == 0
    finally:
        daemon.close()
        notify.close()


def test_upgrade_names_the_new_main_pid_which_then_speaks_to_systemd(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    port = free_port()
    config = daemon_section(tmp_path) + server("echo", listen=f"127.0.0.1:{port}", handler="echo")
    daemon = start_with_env(
        tmp_path,
        config,
        # As systemd starts a service with WatchdogSec: the pings are the main process's.
        prelude="os.environ['WATCHDOG_PID'] = str(os.getpid())",
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="200000",
    )
    new_pid = 0

    def pings() -> int:
        return sum(1 for m in notify.collect() if "WATCHDOG" in m)

    try:
        notify.wait("READY", "1")
        daemon.send(signal.SIGUSR2)
        mainpid = notify.wait("MAINPID")
        new_pid = int(mainpid["MAINPID"])
        assert new_pid != daemon.pid and psutil.pid_exists(new_pid)
        assert daemon.proc.wait(15) == 0
        assert not [m for m in notify.collect()[notify.cursor :] if "STOPPING" in m], (
            "the old daemon hands over; it does not tell systemd the service is stopping"
        )
        assert echo_roundtrip(port) == b"hello\n"
        # The old daemon is gone: the watchdog pings, reloads and the stop are the new one's.
        before = pings()
        wait_for(lambda: pings() - before >= 3, timeout=5)
        os.kill(new_pid, signal.SIGHUP)
        notify.wait("RELOADING", "1")
        notify.wait("READY", "1")
        os.kill(new_pid, signal.SIGTERM)
        notify.wait("STOPPING", "1")
        wait_for(lambda: not psutil.pid_exists(new_pid) or _zombie(new_pid), 15)
    finally:
        if new_pid and psutil.pid_exists(new_pid) and not _zombie(new_pid):
            os.kill(new_pid, signal.SIGTERM)
            wait_for(lambda: not psutil.pid_exists(new_pid) or _zombie(new_pid), 15)
        daemon.close()
        notify.close()


def test_watchdog_for_another_pid_is_not_ours(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    config = daemon_section(tmp_path)
    daemon = start_with_env(
        tmp_path,
        config,
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="100000",
        WATCHDOG_PID="1",
    )
    try:
        notify.wait("READY", "1")
        time.sleep(0.4)
        assert not [m for m in notify.collect() if "WATCHDOG" in m]
    finally:
        daemon.close()
        notify.close()


def test_abstract_notify_socket(tmp_path: Path) -> None:
    name = f"selectd-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    daemon = start_with_env(tmp_path, daemon_section(tmp_path), NOTIFY_SOCKET="@" + name)
    try:
        assert b"READY=1" in sock.recv(4096)
    finally:
        daemon.close()
        sock.close()


# -- pidfile ---------------------------------------------------------------------------------


def test_pidfile_lifecycle(start_daemon, tmp_path: Path) -> None:
    path = tmp_path / "run" / "selectd.pid"
    path.parent.mkdir()
    path.write_text("999999\n")  # stale: no such process
    config = daemon_section(tmp_path, pidfile=str(path))
    daemon = start_daemon(config)
    assert path.read_text() == f"{daemon.pid}\n"
    # A second daemon with the same pidfile refuses to start: the first is alive.
    other = start_daemon(
        daemon_section(tmp_path / "d0", pidfile=str(path))
        .replace(str(tmp_path / "d0"), str(tmp_path))
        .replace("control.sock", "control2.sock"),
        ready=False,
    )
    assert other.proc.wait(15) == 1
    assert f"selectd is already running as pid {daemon.pid}" in other.log_text()
    assert path.read_text() == f"{daemon.pid}\n"
    assert daemon.stop() == 0
    assert not path.exists(), "removed on a clean exit"


# -- privileges ------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privilege_drop_binds_low_port_then_serves_as_nobody(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    nobody = pwd.getpwnam("nobody")
    low = next(p for p in range(900, 1000) if _port_free(p))
    fork_port = free_port()
    # A run directory the dropped daemon owns, as systemd's RuntimeDirectory= would give it.
    run_dir = Path(tempfile.mkdtemp(prefix="selectd-run-", dir="/tmp"))
    os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
    pid_path = run_dir / "selectd.pid"
    config = daemon_section(tmp_path, user="nobody", pidfile=str(pid_path))
    config += server("low", listen=f"127.0.0.1:{low}", handler=f"{handlers}:WhoAmI")
    config += server(
        "forked",
        listen=f"127.0.0.1:{fork_port}",
        handler=f"{handlers}:WhoAmI",
        concurrency="fork",
        workers=2,
    )
    daemon = start_daemon(config)
    uid, euid, _pid = ask(low).split()
    assert int(uid) == int(euid) == nobody.pw_uid
    uid, euid, worker = ask(fork_port).split()
    assert int(uid) == int(euid) == nobody.pw_uid
    assert psutil.Process(int(worker)).uids().real == nobody.pw_uid
    assert psutil.Process(daemon.pid).uids() == (nobody.pw_uid,) * 3
    assert os.stat(daemon.control_socket).st_uid == nobody.pw_uid
    assert pid_path.read_text() == f"{daemon.pid}\n"
    daemon.wait_event("privileges_dropped", user="nobody")
    assert daemon.stop() == 0
    assert not pid_path.exists()
    shutil.rmtree(run_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_dropped_daemon_keeps_its_pidfile_in_a_directory_root_owns() -> None:
    # The shipped unit's RuntimeDirectory belongs to root (the service starts as root to bind).
    # The daemon writes its pidfile there before the drop and hands the file to the user; the
    # successor of an upgrade, born as that user, must still take the file over, and empty it
    # on its way out, though it may not create or remove files there. (In a forked child: the
    # python of this machine may sit where that user cannot exec it.)
    nobody = pwd.getpwnam("nobody")
    run_dir = Path(tempfile.mkdtemp(prefix="selectd-run-", dir="/tmp"))
    run_dir.chmod(0o755)
    path = run_dir / "selectd.pid"
    try:
        pidfile.write(str(path))
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        results, report = os.pipe()
        child = os.fork()
        if child == 0:
            status = 1
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                pidfile.write(str(path))
                taken = path.read_text()
                problem = pidfile.remove(str(path))
                left = path.read_text() if path.exists() else None
                os.write(report, repr((taken, problem, left)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(report)
        with os.fdopen(results) as f:
            outcome = f.read()
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
        # Rewritten in place to name the child; at its exit emptied, as it cannot unlink it.
        assert outcome == repr((f"{child}\n", None, ""))
        pidfile.check(str(path))  # an empty pidfile names no one: the next start goes ahead
    finally:
        shutil.rmtree(run_dir)


def test_unknown_user_refuses_to_start(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(daemon_section(tmp_path, user="no-such-user-xyz"), ready=False)
    assert daemon.proc.wait(15) == 1
    assert "daemon.user: no such user 'no-such-user-xyz'" in daemon.log_text()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- zero-downtime upgrade -------------------------------------------------------------------


class Hammer:
    """Connect, echo one line, close, as fast as it can, on several ports; count failures."""

    def __init__(self, ports: list[int], threads: int = 4) -> None:
        self.ports = ports
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            port = self.ports[(i + n) % len(self.ports)]
            n += 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"ping\n")
                    s.shutdown(socket.SHUT_WR)
                    reply = s.recv(100)
                outcome = None if reply == b"ping\n" else f"port {port}: got {reply!r}"
            except OSError as exc:
                outcome = f"port {port}: {exc!r}"
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_upgrade_under_a_connect_loop_refuses_nothing(start_daemon, tmp_path: Path) -> None:
    ports = [free_port(), free_port(), free_port()]
    unix_path = str(tmp_path / "echo.sock")
    config = daemon_section(tmp_path, pidfile=str(tmp_path / "selectd.pid"))
    config += server("threaded", listen=f"127.0.0.1:{ports[0]}", handler="echo")
    config += server(
        "forked", listen=f"127.0.0.1:{ports[1]}", handler="echo", concurrency="fork", workers=2
    )
    config += server("inline", listen=f"127.0.0.1:{ports[2]}", handler="echo", concurrency="inline")
    config += server("unix", listen=f"unix:{unix_path}", handler="echo")
    daemon = start_daemon(config)
    old_pid = daemon.pid
    with Hammer(ports) as hammer:
        wait_for(lambda: hammer.ok > 200)
        daemon.send(signal.SIGUSR2)
        ready = daemon.wait_event("upgrade_ready", timeout=30)
        new_pid = ready["new_pid"]
        assert daemon.proc.wait(30) == 0, "the old daemon drains and exits 0"
        before = hammer.ok
        wait_for(lambda: hammer.ok > before + 200)
    assert hammer.failures == [], hammer.failures[:5]
    try:
        assert (tmp_path / "selectd.pid").read_text() == f"{new_pid}\n"
        assert psutil.pid_exists(new_pid)
        assert os.path.exists(unix_path), "the unix socket stays for the successor"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(unix_path)
            s.sendall(b"unix\n")
            assert s.recv(10) == b"unix\n"
        # The successor answers on the same control socket.
        reply = daemon.control("status")
        assert reply["result"]["daemon"]["pid"] == new_pid != old_pid
        assert set(reply["result"]["servers"]) == {"threaded", "forked", "inline", "unix"}
        daemon.control("shutdown")
        wait_for(lambda: not psutil.pid_exists(new_pid) or _zombie(new_pid), 15)
        assert not (tmp_path / "selectd.pid").exists()
        assert not os.path.exists(unix_path)
    finally:
        if psutil.pid_exists(new_pid):
            os.kill(new_pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_failed_upgrade_leaves_the_old_daemon_serving(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server("echo", listen=f"127.0.0.1:{port}", handler="echo")
    daemon = start_daemon(config)
    daemon.config_path.write_text("this is not toml [")  # the successor will exit 2
    daemon.send(signal.SIGUSR2)
    failed = daemon.wait_event("upgrade_failed", timeout=30)
    assert "exited" in failed["reason"] or "ready pipe" in failed["reason"]
    assert echo_roundtrip(port) == b"hello\n"
    assert daemon.control("ping")["result"] == "pong"
    assert daemon.stop() == 0


# -- worker health ---------------------------------------------------------------------------


def test_hung_worker_is_killed_and_replaced(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "hang",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Hang",
        concurrency="fork",
        workers=2,
        worker_timeout=0.6,
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hang\n")
        assert s.recv(10) == b"", "the hung request's connection is closed"
    hung = daemon.wait_event("worker_hung", server="hang")
    assert "busy on one request" in hung["reason"]
    wait_for(lambda: len(daemon.find("worker_spawned", server="hang")) >= 3)
    assert int(ask(port)) != hung["worker_pid"]
    # Idle workers heartbeat, so they are never taken for hung ones.
    time.sleep(1.5)
    assert len(daemon.find("worker_hung")) == 1
    assert daemon.stop() == 0


def test_workers_retire_after_max_requests(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "recycled",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Hang",
        concurrency="fork",
        workers=1,
        max_requests=3,
    )
    daemon = start_daemon(config)
    pids = [int(ask(port)) for _ in range(9)]
    assert len(set(pids)) == 3 and pids[0] == pids[2] != pids[3]
    retired = daemon.find("worker_retiring", server="recycled")
    assert len(retired) >= 2 and all(e["reason"] == "max_requests" for e in retired)
    assert daemon.stop() == 0


def test_workers_retire_past_max_rss(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "grow",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Grow",
        concurrency="fork",
        workers=1,
        max_rss="60MiB",
    )
    daemon = start_daemon(config)
    pids = [int(ask(port)) for _ in range(12)]
    assert len(set(pids)) >= 2, "the worker was retired once it grew past 60 MiB"
    retired = daemon.wait_event("worker_retiring", server="grow")
    assert retired["reason"] == "max_rss"
    assert daemon.stop() == 0


def test_selectd_module_runs_from_a_copy_of_argv() -> None:
    # The upgrade re-executes sys.orig_argv: `python -m daemon` must be runnable that way.
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=30,
    )
    assert result.returncode == 0 and "selectd" in result.stdout


# -- socket activation -----------------------------------------------------------------------

ACTIVATE = "/usr/bin/systemd-socket-activate"
needs_activate = pytest.mark.skipif(
    not os.path.exists(ACTIVATE), reason="systemd-socket-activate is not installed"
)


def activated(tmp_path: Path, config: str, *listen_args: str) -> subprocess.Popen[bytes]:
    path = tmp_path / "activated.toml"
    path.write_text(config)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "activated.log", "wb") as log:
        return subprocess.Popen(
            [ACTIVATE, *listen_args, sys.executable, "-m", "daemon", "run", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


@needs_activate
def test_socket_activation_serves_the_named_sockets(tmp_path: Path) -> None:
    web, other = free_port(), free_port()
    config = daemon_section(tmp_path)
    config += server("web", listen="systemd:web", handler="echo")
    config += server("other", listen="systemd:other", handler="echo", concurrency="fork", workers=1)
    proc = activated(
        tmp_path,
        config,
        "-l",
        f"127.0.0.1:{web}",
        "--fdname=web",
        "-l",
        f"127.0.0.1:{other}",
        "--fdname=other",
    )
    try:
        # systemd-socket-activate holds the sockets and starts selectd on the first connection.
        wait_for(lambda: (tmp_path / "activated.log").read_text().count("Listening on") == 2)
        assert echo_roundtrip(web, b"activated\n") == b"activated\n"
        assert echo_roundtrip(other, b"forked\n") == b"forked\n"
        status = control_request(f"{tmp_path}/control.sock", "status")["result"]["servers"]
        assert status["web"]["listen"] == "systemd:web"
        assert status["web"]["address"] == f"127.0.0.1:{web}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "activated.log").read_text()
    assert "LISTEN_FDS" not in log


@needs_activate
@pytest.mark.parametrize(
    ("listen_args", "config_keys", "message"),
    [
        (("--fdname=web",), {"listen": "systemd:nope"}, "no socket named 'nope'"),
        (("--datagram", "--fdname=web"), {"listen": "systemd:web"}, "is a datagram socket"),
    ],
)
def test_socket_activation_mismatch_is_a_clear_error(
    tmp_path: Path, listen_args: tuple[str, ...], config_keys: dict[str, str], message: str
) -> None:
    port = free_port(socket.SOCK_DGRAM if "--datagram" in listen_args else socket.SOCK_STREAM)
    config = daemon_section(tmp_path) + server("web", handler="echo", **config_keys)
    proc = activated(tmp_path, config, "-l", f"127.0.0.1:{port}", *listen_args)
    try:
        kind = socket.SOCK_DGRAM if "--datagram" in listen_args else socket.SOCK_STREAM
        wait_for(lambda: "Listening on" in (tmp_path / "activated.log").read_text())
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(1)
            s.connect(("127.0.0.1", port))
            s.send(b"wake up\n")  # the first packet starts selectd
        wait_for(lambda: message in (tmp_path / "activated.log").read_text(), 15)
        assert proc.wait(15) == 1
        assert "Traceback" not in (tmp_path / "activated.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
