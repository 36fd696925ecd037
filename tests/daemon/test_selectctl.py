"""`selectctl` as a command against a real daemon: output, exit statuses, every command."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, daemon_section, echo_roundtrip, free_port, wait_for
from tests.daemon.control_client import (
    control_path,
    refused,
    result,
    server_section,
    server_status,
    write_handlers,
)

CLEAR = "\x1b[H\x1b[2J"  # what --watch writes before each frame


def selectctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.ctl", *args],
        capture_output=True,
        text=True,
        env=ctl_env(),
        timeout=timeout,
    )


def ctl_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SELECTD_CONFIG", None)
    return env


def echo_server(name: str, port: int, **keys: object) -> str:
    return server_section(name, listen=f"127.0.0.1:{port}", handler="echo", **keys)


def table_row(output: str, name: str) -> list[str]:
    """The cells of the status table's row for server `name`."""
    rows = [line.split() for line in output.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, output
    return rows[0]


def test_status_as_a_table_and_as_json(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    web, forked = free_port(), free_port()
    config = daemon_section(tmp_path)
    config += echo_server("web", web)
    config += echo_server("forked", forked, concurrency="fork", workers=1)
    daemon = start_daemon(config)
    assert selectctl("-s", path, "stop", "web").returncode == 0
    wait_for(lambda: server_status(path, "web")["state"] == "stopped")
    assert echo_roundtrip(forked) == b"hello\n"
    wait_for(lambda: server_status(path, "forked")["completed"] == 1)

    table = selectctl("-s", path, "status")
    assert (table.returncode, table.stderr) == (0, "")
    assert f"pid {daemon.pid}" in table.stdout.splitlines()[0]
    header = table.stdout.splitlines()[1].split()
    assert header[:3] == ["server", "state", "listen"]
    assert table_row(table.stdout, "web")[:3] == ["web", "stopped", f"127.0.0.1:{web}"]
    forked_row = dict(zip(header, table_row(table.stdout, "forked"), strict=True))
    assert forked_row["state"] == "running"
    assert forked_row["requests"] == "1"
    [worker] = [c.pid for c in daemon.children()]
    assert f"forked worker {worker}: idle, 1 requests" in table.stdout

    one = selectctl("-s", path, "status", "forked")
    assert one.returncode == 0
    assert "web" not in one.stdout and "forked" in one.stdout

    as_json = selectctl("-s", path, "--json", "status")
    assert as_json.returncode == 0
    status = json.loads(as_json.stdout)
    assert status["daemon"]["pid"] == daemon.pid
    assert {n: s["state"] for n, s in status["servers"].items()} == {
        "web": "stopped",
        "forked": "running",
    }
    pong = selectctl("-s", path, "--json", "ping")
    assert json.loads(pong.stdout) == "pong"


def test_exit_statuses_and_where_the_messages_go(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    start_daemon(daemon_section(tmp_path) + echo_server("echo", port))

    ok = selectctl("-s", path, "ping")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "pong\n", "")

    refused_reply = selectctl("-s", path, "stop", "nope")
    assert refused_reply.returncode == 1
    assert refused_reply.stdout == ""
    assert refused_reply.stderr == "selectctl: no server named 'nope'\n"
    negative = selectctl("-s", path, "shutdown", "-1")
    assert negative.returncode == 1
    assert "timeout" in negative.stderr
    assert result(path, "status")["daemon"]["phase"] == "running"

    missing = f"{tmp_path}/nobody-here/control.sock"
    unreachable = selectctl("-s", missing, "ping")
    assert unreachable.returncode == 2
    assert missing in unreachable.stderr
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()
    nobody_listens = selectctl("-s", str(stale), "status")
    assert nobody_listens.returncode == 2
    assert str(stale) in nobody_listens.stderr

    for usage in (("stop",), ("shutdown", "soon"), ("frobnicate",), ("-s", path)):
        bad = selectctl("-s", path, *usage) if usage[0] != "-s" else selectctl(*usage)
        assert bad.returncode == 2, (usage, bad)
        assert "usage: selectctl" in bad.stderr, usage
    assert echo_roundtrip(port) == b"hello\n", "no usage error reached the daemon"


def test_config_option_finds_the_socket(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    found = selectctl("-c", str(daemon.config_path), "ping")
    assert (found.returncode, found.stdout) == (0, "pong\n"), found.stderr
    missing = selectctl("-c", f"{tmp_path}/missing.toml", "ping")
    assert missing.returncode == 2
    assert "missing.toml" in missing.stderr


def test_config_option_does_not_need_the_handler_modules(start_daemon, tmp_path: Path) -> None:
    handlers = write_handlers(tmp_path)  # on the daemon's PYTHONPATH, not on selectctl's
    config = daemon_section(tmp_path) + server_section(
        "greet",
        listen=f"127.0.0.1:{free_port()}",
        handler=f"{handlers}:Greeting",
        options={"greeting": "hi"},
    )
    daemon = start_daemon(config)
    found = selectctl("-c", str(daemon.config_path), "ping")
    assert (found.returncode, found.stdout) == (0, "pong\n"), found.stderr


@pytest.mark.parametrize("seconds", ["-1", "nan"])
def test_watch_with_a_bad_interval_is_a_usage_error(
    start_daemon, tmp_path: Path, seconds: str
) -> None:
    start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    bad = selectctl("-s", control_path(tmp_path), "--watch", seconds, "status", timeout=10)
    assert "Traceback" not in bad.stderr, bad.stderr
    assert bad.returncode == 2
    assert "usage: selectctl" in bad.stderr


def test_every_command_through_selectctl(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port, added = free_port(), free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("echo", port))

    def ctl(*args: str) -> str:
        done = selectctl("-s", path, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    assert json.loads(ctl("pause", "echo")) == {
        "server": "echo",
        "state": "paused",
        "done": "paused",
    }
    assert server_status(path, "echo")["state"] == "paused"
    assert json.loads(ctl("resume", "echo"))["state"] == "running"
    assert json.loads(ctl("stop", "echo"))["done"] == "stopping"
    wait_for(lambda: server_status(path, "echo")["state"] == "stopped")
    assert refused(port)
    assert json.loads(ctl("start", "echo"))["state"] == "running"
    assert echo_roundtrip(port) == b"hello\n"

    daemon.config_path.write_text(head + echo_server("echo", port) + echo_server("new", added))
    assert ctl("reload").splitlines() == ["added: new", "unchanged: echo"]
    assert echo_roundtrip(added) == b"hello\n"
    assert json.loads(ctl("--json", "reload"))["unchanged"] == ["echo", "new"]

    assert list(tomllib.loads(ctl("config"))["servers"]) == ["echo", "new"]
    families = {f.name: f for f in text_string_to_metric_families(ctl("metrics"))}
    requests = {s.labels["server"]: s.value for s in families["selectd_requests"].samples}
    assert requests == {"echo": 1, "new": 1}

    assert json.loads(ctl("shutdown", "5"))["phase"] in ("stopping", "stopped")
    assert daemon.proc.wait(10) == 0
    assert daemon.wait_event("shutdown_begun")["timeout"] == 5
    gone = selectctl("-s", path, "ping")
    assert gone.returncode == 2 and path in gone.stderr


class Frames:
    """The frames `selectctl --watch` draws, read from its stdout as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buffer = b""
        self._taken = 0

    def next(self, timeout: float = 10) -> str:
        """The next complete frame (one the following frame's CLEAR has closed)."""
        deadline = time.monotonic() + timeout
        while True:
            frames = self._buffer.decode().split(CLEAR)[1:-1]
            if len(frames) > self._taken:
                self._taken += 1
                return frames[self._taken - 1]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no new frame in {timeout}s: {self._buffer!r}"
            if select.select([self._fd], [], [], remaining)[0]:
                chunk = os.read(self._fd, 65536)
                assert chunk, f"selectctl --watch ended: {self._buffer!r}"
                self._buffer += chunk


def requests_shown(frame: str, name: str) -> str:
    header = frame.splitlines()[1].split()
    return dict(zip(header, table_row(frame, name), strict=True))["requests"]


def test_status_watch_redraws_until_stopped(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    watch = subprocess.Popen(
        [sys.executable, "-m", "daemon.ctl", "-s", path, "--watch", "0.2", "status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ctl_env(),
    )
    try:
        frames = Frames(watch)
        for _ in range(2):
            frame = frames.next()
            assert table_row(frame, "echo")[:2] == ["echo", "running"]
            assert requests_shown(frame, "echo") == "0"
        assert echo_roundtrip(port) == b"hello\n"
        wait_for(lambda: server_status(path, "echo")["completed"] == 1)
        # A later frame shows the request: the figures are fetched again for each frame.
        deadline = time.monotonic() + 10
        while requests_shown(frames.next(), "echo") != "1":
            assert time.monotonic() < deadline, "--watch never showed the new request"
        assert watch.poll() is None, "it keeps refreshing until stopped"
    finally:
        watch.terminate()
        watch.wait(10)
        assert watch.stdout is not None
        watch.stdout.close()
    assert watch.returncode == -signal.SIGTERM
