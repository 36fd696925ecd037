"""The control socket against a real daemon: access, every command, counters, protocol abuse."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import daemon as daemon_package
from tests.conftest import Daemon, daemon_section, echo_roundtrip, free_port, wait_for
from tests.daemon.control_client import (
    ControlClient,
    call,
    control_path,
    daemon_config,
    echo_on,
    error,
    held_connection,
    refused,
    result,
    server_section,
    server_status,
    write_handlers,
)

PING = b'{"command": "ping"}\n'
COMMANDS = {
    "ping",
    "status",
    "reload",
    "start",
    "stop",
    "pause",
    "resume",
    "shutdown",
    "config",
    "metrics",
}
DAEMON_KEYS = {"pid", "version", "uptime", "config", "rss", "cpu_percent", "fds", "threads"}
SERVER_KEYS = {
    "state",
    "listen",
    "socket_type",
    "concurrency",
    "workers",
    "requests",
    "errors",
    "denied",
    "rejected",
    "active",
    "queued",
}
WORKER_KEYS = {"pid", "rss", "cpu_percent", "requests"}


def echo_server(name: str, port: int, **keys: object) -> str:
    """A thread-pool echo server: a connection held open is a request in flight."""
    return server_section(name, listen=f"127.0.0.1:{port}", handler="echo", **keys)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the socket ------------------------------------------------------------------------------


def test_socket_is_0600_in_a_new_0700_directory_and_removed_at_exit(
    start_daemon, tmp_path: Path
) -> None:
    directory = tmp_path / "run" / "selectd"
    path = directory / "control.sock"
    daemon = start_daemon(daemon_config(path) + echo_server("echo", free_port()))
    st_sock = os.stat(path)
    assert stat.S_ISSOCK(st_sock.st_mode)
    assert mode(path) == 0o600
    assert mode(directory) == 0o700
    assert st_sock.st_uid == os.getuid()
    assert result(path, "ping") == "pong"
    assert daemon.stop() == 0
    assert not path.exists(), "the daemon removes its control socket when it exits"


def test_stale_socket_left_by_a_dead_process_is_replaced(start_daemon, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens behind it
    os.chmod(path, 0o644)  # (inode numbers are reused: the mode tells the two files apart)
    start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    assert result(path, "ping") == "pong"
    assert mode(path) == 0o600, "a new socket, bound by the daemon"


def test_second_daemon_on_the_same_socket_fails_and_the_first_keeps_serving(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    port = free_port()
    first = start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    inode = os.stat(path).st_ino
    second = start_daemon(daemon_section(tmp_path) + echo_server("other", free_port()), ready=False)
    assert second.proc.wait(15) == 1
    assert "another selectd is running and answering there" in second.log_text()
    assert second.find("startup_failed")
    assert os.stat(path).st_ino == inode, "the second daemon must not touch the live socket"
    assert result(path, "ping") == "pong"
    assert result(path, "status")["daemon"]["pid"] == first.pid
    assert echo_roundtrip(port) == b"hello\n"


def test_second_start_of_the_same_config_says_another_selectd_runs(
    start_daemon, tmp_path: Path
) -> None:
    config = daemon_section(tmp_path) + echo_server("echo", free_port())
    start_daemon(config)
    second = start_daemon(config, ready=False)
    assert second.proc.wait(15) == 1
    assert "another selectd is running and answering there" in second.log_text()


def test_a_file_that_is_not_a_socket_is_never_deleted(start_daemon, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("not a socket\n")
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()), ready=False)
    wait_for(lambda: daemon.proc.poll() is not None or daemon.find("daemon_ready"))
    assert stat.S_ISREG(os.stat(path).st_mode), "the file was deleted (and a socket bound there)"
    assert path.read_text() == "not a socket\n"
    assert daemon.proc.wait(10) == 1
    assert "is not a" in daemon.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_peers_of_another_user_are_cut_off_without_a_reply(start_daemon) -> None:
    nobody = pwd.getpwnam("nobody")
    # tmp_path's parents are private to root; this directory is one `nobody` can traverse.
    base = Path(tempfile.mkdtemp(prefix="selectd-peer-"))
    try:
        os.chmod(base, 0o755)
        directory = base / "ctl"
        path = directory / "control.sock"
        daemon = start_daemon(daemon_config(path) + echo_server("echo", free_port()))
        os.chmod(directory, 0o755)
        os.chmod(path, 0o666)  # the file mode lets `nobody` connect; SO_PEERCRED must not

        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                os.close(reader)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(str(path))
                try:
                    sock.sendall(PING)  # the daemon may have closed it already
                    data = sock.recv(4096)
                except (BrokenPipeError, ConnectionResetError):
                    data = b""
                os.write(writer, b"closed" if data == b"" else b"reply:" + data)
            except BaseException as exc:
                os.write(writer, f"error:{exc!r}".encode())
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            outcome = pipe.read()
        assert os.waitpid(pid, 0)[1] == 0
        assert outcome == b"closed", outcome
        daemon.wait_event("control_denied", uid=nobody.pw_uid)
        assert result(path, "ping") == "pong", "root is still served"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- commands --------------------------------------------------------------------------------


def test_ping_and_status_of_the_daemon_and_every_server(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    forked_port = free_port()
    config = daemon_section(tmp_path)
    config += echo_server("threaded", free_port(), concurrency="thread", workers=3)
    config += echo_server("forked", forked_port, concurrency="fork", workers=2)
    config += echo_server("inline", free_port(), concurrency="inline")
    config += server_section(
        "udp",
        listen=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        handler="echo",
        socket_type="dgram",
    )
    daemon = start_daemon(config)
    assert result(path, "ping") == "pong"

    status = result(path, "status")
    d = status["daemon"]
    assert set(d) >= DAEMON_KEYS
    assert d["pid"] == daemon.pid
    assert d["version"] == daemon_package.__version__
    assert d["config"] == str(daemon.config_path)
    assert d["uptime"] >= 0
    assert d["rss"] > 0 and d["fds"] > 0 and d["threads"] >= 1
    assert isinstance(d["cpu_percent"], float)
    assert list(status["servers"]) == ["threaded", "forked", "inline", "udp"]
    for name, s in status["servers"].items():
        assert set(s) >= SERVER_KEYS, name
        assert s["state"] == "running"
        assert (s["requests"], s["errors"], s["denied"], s["rejected"]) == (0, 0, 0, 0)
        assert (s["active"], s["queued"]) == (0, 0)
    servers = status["servers"]
    assert (servers["threaded"]["concurrency"], servers["threaded"]["workers"]) == ("thread", 3)
    assert servers["udp"]["socket_type"] == "dgram"
    assert servers["forked"]["listen"] == f"127.0.0.1:{forked_port}"
    workers = servers["forked"]["worker_processes"]
    assert len(workers) == 2
    for w in workers:
        assert set(w) >= WORKER_KEYS
        assert w["rss"] > 0
    assert {w["pid"] for w in workers} == {c.pid for c in daemon.children()}
    assert "worker_processes" not in servers["threaded"]

    assert echo_roundtrip(forked_port) == b"hello\n"
    forked = wait_for(
        lambda: (s := server_status(path, "forked"))["completed"] == 1 and s, timeout=5
    )
    assert sum(w["requests"] for w in forked["worker_processes"]) == 1

    one = result(path, "status", server="inline")
    assert list(one["servers"]) == ["inline"]
    assert set(one["daemon"]) >= DAEMON_KEYS
    assert error(path, "status", server="nope") == "no server named 'nope'"
    assert "string" in error(path, "status", server=["inline"])


def test_server_commands_refuse_bad_arguments_and_wrong_states(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    port = free_port()
    start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    for command in ("start", "stop", "pause", "resume"):
        message = error(path, command)
        assert command in message and '"server"' in message
        assert error(path, command, server=5) == '"server" must be a string'
        assert error(path, command, server={"name": "echo"}) == '"server" must be a string'
        assert error(path, command, server="nope") == "no server named 'nope'"
    assert server_status(path, "echo")["state"] == "running", "no bad request changed anything"

    assert "is already running" in error(path, "start", server="echo")
    assert "is not paused" in error(path, "resume", server="echo")
    assert result(path, "stop", server="echo")["done"] == "stopping"
    wait_for(lambda: server_status(path, "echo")["state"] == "stopped")
    assert "is not running (it is stopped)" in error(path, "stop", server="echo")
    assert "is not running" in error(path, "pause", server="echo")
    assert "is not paused" in error(path, "resume", server="echo")
    assert result(path, "start", server="echo") == {
        "server": "echo",
        "state": "running",
        "done": "started",
    }
    assert result(path, "pause", server="echo")["state"] == "paused"
    assert "is not running (it is paused)" in error(path, "pause", server="echo")
    assert "is already paused" in error(path, "start", server="echo")
    assert result(path, "resume", server="echo")["state"] == "running"
    assert echo_roundtrip(port) == b"hello\n"


def test_config_is_the_effective_config_as_toml(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    config = daemon_section(tmp_path) + echo_server("echo", port, workers=3)
    config += server_section("discard", listen=f"127.0.0.1:{free_port()}", handler="discard")
    start_daemon(config)
    doc = tomllib.loads(result(path, "config"))
    assert list(doc["servers"]) == ["echo", "discard"]
    assert doc["daemon"]["control_socket"] == path
    echo = doc["servers"]["echo"]
    assert echo["listen"] == f"127.0.0.1:{port}"
    assert echo["workers"] == 3
    assert echo["concurrency"] == "thread", "defaults are filled in"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_is_prometheus_text_with_a_family_per_figure(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    config = (
        daemon_section(tmp_path) + echo_server("a", free_port()) + echo_server("b", free_port())
    )
    start_daemon(config)
    text = result(path, "metrics")
    found = families(text)
    expected = {
        "selectd_requests": "counter",
        "selectd_errors": "counter",
        "selectd_denied": "counter",
        "selectd_rejected": "counter",
        "selectd_active_requests": "gauge",
        "selectd_queued_requests": "gauge",
        "selectd_request_duration_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert found[name].type == kind, name
        assert {s.labels["server"] for s in found[name].samples} == {"a", "b"}, name
    values = samples(text)
    for name in ("requests", "errors", "denied", "rejected"):
        assert values[(f"selectd_{name}_total", (("server", "a"),))] == 0
    histogram = found["selectd_request_duration_seconds"]
    buckets = [s for s in histogram.samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets if s.labels["server"] == "a"} >= {"0.001", "+Inf"}
    assert len(buckets) > 2 * 2


def test_counters_follow_traffic_in_status_and_metrics(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    handlers = write_handlers(tmp_path)
    ports = {name: free_port() for name in ("echo", "fail", "denied", "busy")}
    config = daemon_section(tmp_path)
    config += echo_server("echo", ports["echo"])
    config += server_section(
        "fail", listen=f"127.0.0.1:{ports['fail']}", handler=f"{handlers}:Fail"
    )
    config += echo_server("denied", ports["denied"], deny=["127.0.0.0/8"])
    config += echo_server("busy", ports["busy"], workers=1, max_queue=0)
    start_daemon(config)

    n = 7
    for i in range(n):
        assert echo_roundtrip(ports["echo"], f"{i}\n".encode()) == f"{i}\n".encode()
    assert echo_roundtrip(ports["fail"], b"please\n") == b""
    assert echo_roundtrip(ports["denied"], b"let me in\n") == b""
    with held_connection(ports["busy"]) as in_flight:
        wait_for(lambda: server_status(path, "busy")["active"] == 1)
        with socket.create_connection(("127.0.0.1", ports["busy"]), timeout=10) as turned_away:
            assert turned_away.recv(100) == b"", "no room: the connection is closed at once"
        wait_for(lambda: server_status(path, "busy")["rejected"] == 1)
        assert echo_on(in_flight, b"still here\n") == b"still here\n"

    expected = {
        "echo": {"requests": n, "completed": n, "errors": 0, "denied": 0, "rejected": 0},
        "fail": {"requests": 1, "completed": 1, "errors": 1, "denied": 0, "rejected": 0},
        "denied": {"requests": 0, "completed": 0, "errors": 0, "denied": 1, "rejected": 0},
        "busy": {"requests": 1, "completed": 1, "errors": 0, "denied": 0, "rejected": 1},
    }

    def settled() -> dict[str, Any] | None:
        servers = result(path, "status")["servers"]
        figures = {n: {k: s[k] for k in expected[n]} for n, s in servers.items()}
        return servers if figures == expected else None

    servers = wait_for(settled, timeout=10)
    assert all(s["active"] == 0 and s["queued"] == 0 for s in servers.values())

    values = samples(result(path, "metrics"))
    for name, figures in expected.items():
        label = (("server", name),)
        for key in ("requests", "errors", "denied", "rejected"):
            assert values[(f"selectd_{key}_total", label)] == figures[key], (name, key)
        assert values[("selectd_active_requests", label)] == 0
        assert values[("selectd_queued_requests", label)] == 0
        count = values[("selectd_request_duration_seconds_count", label)]
        assert count == figures["completed"], name
        inf = values[("selectd_request_duration_seconds_bucket", (("le", "+Inf"), *label))]
        assert inf == figures["completed"], name
        assert values[("selectd_request_duration_seconds_sum", label)] >= 0


# -- stop, start, pause, resume --------------------------------------------------------------


def test_stop_refuses_new_connections_drains_the_one_in_flight_and_start_serves_again(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", port, workers=2))
    in_flight = held_connection(port)
    with in_flight:
        reply = result(path, "stop", server="echo")
        assert reply == {"server": "echo", "state": "draining", "done": "stopping"}
        assert refused(port), "stop closes the listener"
        assert server_status(path, "echo")["state"] == "draining"
        assert echo_on(in_flight, b"finishing\n") == b"finishing\n"
    daemon.wait_event("server_stopped", server="echo")
    assert server_status(path, "echo")["state"] == "stopped"
    assert refused(port)

    assert result(path, "start", server="echo")["state"] == "running"
    assert echo_roundtrip(port, b"again\n") == b"again\n"
    wait_for(lambda: server_status(path, "echo")["completed"] == 2)


def test_pause_keeps_the_listener_and_a_waiting_client_is_served_after_resume(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    port = free_port()
    start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    assert result(path, "pause", server="echo")["state"] == "paused"
    # The listener stays bound: connect succeeds, the connection waits in the backlog.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
        waiting.sendall(b"patience\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(100)  # nobody accepts it while the server is paused
        status = server_status(path, "echo")
        assert (status["state"], status["requests"]) == ("paused", 0)
        assert result(path, "resume", server="echo")["state"] == "running"
        waiting.settimeout(10)
        assert echo_on(waiting, b"") == b"patience\n"


# -- shutdown --------------------------------------------------------------------------------


def test_shutdown_refuses_a_bad_timeout_then_stops_gracefully(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    with ControlClient(path) as client:
        for timeout in ("soon", -1, -0.5, True, [1], {"s": 1}):
            reply = client.call("shutdown", timeout=timeout)
            assert reply == {
                "ok": False,
                "error": '"timeout" must be a number of seconds from 0 to 3600',
            }
        for raw in (b"NaN", b"Infinity", b"-Infinity"):
            client.send_raw(b'{"command": "shutdown", "timeout": ' + raw + b"}\n")
            assert client.reply()["ok"] is False, raw
        assert client.call("ping")["result"] == "pong"
    assert result(path, "status")["daemon"]["phase"] == "running"
    assert echo_roundtrip(port) == b"hello\n"
    assert not daemon.find("shutdown_begun")

    assert result(path, "shutdown")["phase"] in ("stopping", "stopped")
    assert daemon.proc.wait(10) == 0
    assert daemon.find("shutdown_begun")
    done = daemon.wait_event("shutdown_complete")
    assert done["forced"] == 0
    assert not os.path.exists(path)


def test_shutdown_with_a_timeout_forces_a_request_in_flight(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path, shutdown_timeout=60) + echo_server("echo", port))
    with held_connection(port) as in_flight:
        started = time.monotonic()
        assert result(path, "shutdown", timeout=0.5) == {"phase": "stopping"}
        begun = daemon.wait_event("shutdown_begun")
        assert (begun["timeout"], begun["in_flight"]) == (0.5, 1)
        assert in_flight.recv(100) == b"", "the request is cut off at the timeout"
        assert time.monotonic() - started > 0.4
    assert daemon.proc.wait(10) == 1
    assert daemon.wait_event("shutdown_complete")["forced"] == 1
    assert daemon.find("shutdown_forcing")


@pytest.mark.parametrize("timeout", [1e10, 10**400], ids=["1e10", "10**400"])
def test_shutdown_refuses_a_timeout_the_config_would_refuse(
    start_daemon, tmp_path: Path, timeout: float
) -> None:
    path = control_path(tmp_path)
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", port))
    with held_connection(port) as in_flight:
        message = error(path, "shutdown", timeout=timeout)
        assert "timeout" in message and "internal error" not in message, message
        assert result(path, "status")["daemon"]["phase"] == "running"
        assert echo_on(in_flight, b"still served\n") == b"still served\n"
    assert not daemon.find("control_command_failed")


# -- the protocol ----------------------------------------------------------------------------


def test_requests_sharing_a_connection_are_answered_in_order(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    with ControlClient(path) as client:
        lines = [
            {"command": "ping"},
            {"command": "status", "server": "echo"},
            {"command": "nope"},
            {"command": "config"},
            {"command": "ping"},
        ]
        client.send_raw(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        replies = [client.reply() for _ in lines]
    assert replies[0] == {"ok": True, "result": "pong"}
    assert list(replies[1]["result"]["servers"]) == ["echo"]
    assert replies[2]["ok"] is False
    assert "[servers.echo]" in replies[3]["result"]
    assert replies[4] == {"ok": True, "result": "pong"}


BAD_REQUESTS = [
    (b'{"command": "ping"\n', "not valid JSON"),
    (b"\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"ping"\n', "must be a JSON object"),
    (b"{}\n", 'needs a "command" string'),
    (b'{"server": "echo"}\n', 'needs a "command" string'),
    (b'{"command": 7}\n', 'needs a "command" string'),
    (b'{"command": null}\n', 'needs a "command" string'),
    (b'{"command": ["ping"]}\n', 'needs a "command" string'),
    (b'{"command": "frobnicate"}\n', "unknown command 'frobnicate'"),
    (b'\xff\xfe{"command": "ping"}\n', "not valid UTF-8"),
    (b'{"command": "p\xc3\x28ng"}\n', "not valid UTF-8"),
]


def test_bad_requests_get_an_error_and_the_connection_stays_usable(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    with ControlClient(path) as client:
        for line, fragment in BAD_REQUESTS:
            client.send_raw(line)
            reply = client.reply()
            assert reply["ok"] is False, line
            assert fragment in reply["error"], (line, reply)
            assert client.call("ping") == {"ok": True, "result": "pong"}, line
        unknown = client.call("frobnicate")["error"]
        assert all(name in unknown for name in COMMANDS), "the error lists the commands"
    assert not daemon.find("control_command_failed")


def test_overlong_line_is_refused_and_other_clients_are_still_served(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    limit = 64 * 1024
    with ControlClient(path) as long_line, ControlClient(path) as other:
        long_line.send_raw(b'{"command": "ping", "pad": "' + b"x" * (limit + 4096) + b'"}\n')
        answer = long_line.read_line()
        if answer:  # an error reply, or the connection closed: both are acceptable
            reply = json.loads(answer)
            assert reply["ok"] is False and "longer than" in reply["error"], reply
        assert other.call("ping")["result"] == "pong"
    with ControlClient(path) as endless:
        endless.send_raw(b"y" * (limit + 1024))  # no newline at all
        reply = endless.reply()
        assert reply["ok"] is False and "longer than" in reply["error"]
        assert endless.read_line() == b"", "a line that never ends costs the connection"
    assert result(path, "ping") == "pong"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
JUNK_LINES = st.lists(
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.just("command"), st.text(max_size=12)).map(
        lambda v: json.dumps(v).encode()
    ),
    max_size=8,
)


def test_random_bytes_never_crash_the_daemon(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    daemon = start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(lines=JUNK_LINES, tail=st.binary(max_size=50))
    def check(lines: list[bytes], tail: bytes) -> None:
        lines = [
            line
            for line in lines
            if not any(f'"{name}"'.encode() in line for name in COMMANDS - {"ping", "status"})
        ]  # no junk line may happen to be a real command that changes the daemon
        data = b"".join(line.replace(b"\n", b"") + b"\n" for line in lines) + tail
        with ControlClient(path) as client:
            client.send_raw(data)
            client.sock.shutdown(socket.SHUT_WR)
            replies = []
            while line := client.read_line():
                replies.append(json.loads(line))
        assert len(replies) == data.count(b"\n"), "one reply per complete line, none for the tail"
        assert all(isinstance(r, dict) and isinstance(r["ok"], bool) for r in replies)
        assert result(path, "ping") == "pong"

    check()
    assert daemon.proc.poll() is None
    assert not daemon.find("control_command_failed")


def test_fifty_concurrent_clients_all_get_pong(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    start_daemon(daemon_section(tmp_path) + echo_server("echo", free_port()))
    count = 50
    barrier = threading.Barrier(count)
    replies: list[Any] = []

    def client() -> None:
        try:
            with ControlClient(path) as c:
                barrier.wait(10)
                replies.append(c.call("ping"))
        except Exception as exc:  # reported through `replies`
            replies.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert replies == [{"ok": True, "result": "pong"}] * count


# -- a client that never reads its replies ---------------------------------------------------


@dataclass
class Flood:
    """What happened while one client sent status requests without reading the replies."""

    daemon: Daemon
    path: str
    sent: int = 0
    flood_error: BaseException | None = None
    latencies: list[float] = field(default_factory=list)
    after: Any = None


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flood]:
    tmp = tmp_path_factory.mktemp("flood")
    config = daemon_section(tmp) + echo_server("echo", free_port())
    daemon = Daemon(tmp, config, path=str(tmp))
    try:
        daemon.wait_ready()
        outcome = Flood(daemon, control_path(tmp))
        stuck = ControlClient(outcome.path, timeout=30)
        chunk = b'{"command": "status"}\n' * 500

        def send_forever() -> None:
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    stuck.send_raw(chunk)
                    outcome.sent += 500
            except OSError as exc:
                outcome.flood_error = exc

        sender = threading.Thread(target=send_forever)
        sender.start()
        while sender.is_alive():
            started = time.monotonic()
            with ControlClient(outcome.path, timeout=30) as other:
                assert other.call("ping")["result"] == "pong"
            outcome.latencies.append(time.monotonic() - started)
        sender.join()
        stuck.close()
        outcome.after = call(outcome.path, "ping")
        yield outcome
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        daemon.close()


def not_reading_warnings(daemon: Daemon) -> list[dict[str, Any]]:
    # Matched by shape, not name: the warning that a client's replies piled up carries the
    # size of the pile.
    return [e for e in daemon.events() if e.get("level") == "warning" and "pending" in e]


def test_client_that_never_reads_is_cut_off(flood: Flood) -> None:
    assert isinstance(flood.flood_error, (BrokenPipeError, ConnectionResetError)), flood.flood_error
    assert not_reading_warnings(flood.daemon)
    assert flood.after == {"ok": True, "result": "pong"}
    assert flood.daemon.proc.poll() is None


def test_client_that_never_reads_does_not_stall_other_clients(flood: Flood) -> None:
    assert flood.latencies
    assert max(flood.latencies) < 1.0, f"a ping took {max(flood.latencies):.2f}s"


def test_client_that_never_reads_is_logged_once(flood: Flood) -> None:
    assert len(not_reading_warnings(flood.daemon)) == 1


# -- graceful shutdown over the socket is SIGTERM's ------------------------------------------


@pytest.mark.parametrize("how", ["command", "SIGTERM"])
def test_graceful_shutdown_drains_and_exits_zero(start_daemon, tmp_path: Path, how: str) -> None:
    path = control_path(tmp_path)
    port = free_port()
    daemon = start_daemon(daemon_section(tmp_path, shutdown_timeout=30) + echo_server("e", port))
    with held_connection(port) as in_flight:
        if how == "command":
            assert result(path, "shutdown") == {"phase": "stopping"}
        else:
            daemon.send(signal.SIGTERM)
        begun = daemon.wait_event("shutdown_begun")
        assert (begun["timeout"], begun["in_flight"]) == (30, 1)
        assert refused(port)
        assert result(path, "status")["daemon"]["phase"] == "stopping"
        assert echo_on(in_flight, b"last words\n") == b"last words\n"
    assert daemon.proc.wait(10) == 0
    done = daemon.wait_event("shutdown_complete")
    assert (done["drained"], done["forced"]) == (1, 0)
    assert not os.path.exists(path)
