"""Reload against a real daemon: the config file is rewritten, then `reload` or SIGHUP."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Any

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for
from tests.daemon.control_client import (
    control_path,
    echo_on,
    error,
    held_connection,
    listener_inode,
    refused,
    result,
    server_section,
    server_status,
    servers_status,
    write_handlers,
)


def echo_server(name: str, port: int, **keys: object) -> str:
    return server_section(name, listen=f"127.0.0.1:{port}", handler="echo", **keys)


def plan(**lists: list[str]) -> dict[str, list[str]]:
    """The reload reply: every list empty but those given."""
    keys = ("added", "removed", "changed", "unchanged", "daemon_applied", "daemon_needs_restart")
    return {key: lists.get(key, []) for key in keys}


class Hammer(threading.Thread):
    """Back-to-back requests (connect, one line, one reply line) until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.replies: list[bytes] = []
        self.failures: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    self.replies.append(echo_on(s, b"n\n"))
            except OSError as exc:
                self.failures.append(exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(20)


def test_reload_adds_removes_moves_and_leaves_unchanged_servers_alone(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    keep, gone, old_move, new_move, fresh = (free_port() for _ in range(5))
    head = daemon_section(tmp_path)
    daemon = start_daemon(
        head + echo_server("keep", keep) + echo_server("gone", gone) + echo_server("move", old_move)
    )
    keep_inode = listener_inode(daemon.pid, keep)
    with held_connection(keep) as persistent, held_connection(gone) as in_flight:
        daemon.config_path.write_text(
            head
            + echo_server("keep", keep)
            + echo_server("move", new_move)
            + echo_server("new", fresh)
        )
        reply = result(path, "reload")
        assert reply == plan(added=["new"], removed=["gone"], changed=["move"], unchanged=["keep"])

        # Opened before the reload, still served on the same connection and listener.
        assert echo_on(persistent, b"same socket\n") == b"same socket\n"
        assert listener_inode(daemon.pid, keep) == keep_inode
        assert echo_roundtrip(fresh, b"added\n") == b"added\n"
        assert echo_roundtrip(new_move, b"moved\n") == b"moved\n"
        assert refused(old_move)

        assert refused(gone), "a removed server stops taking connections at once"
        assert servers_status(path)["gone"]["state"] == "draining"
        assert "no server named 'gone'" in error(path, "stop", server="gone")
        assert echo_on(in_flight, b"finishing\n") == b"finishing\n"
    daemon.wait_event("server_stopped", server="gone")
    assert list(servers_status(path)) == ["keep", "move", "new"]
    assert server_status(path, "move")["listen"] == f"127.0.0.1:{new_move}"
    assert daemon.stop() == 0


def test_changed_server_keeps_its_socket_and_takes_new_settings_for_new_requests(
    start_daemon, tmp_path: Path
) -> None:
    path = control_path(tmp_path)
    handlers = write_handlers(tmp_path)
    port = free_port()
    head = daemon_section(tmp_path)

    def config(greeting: str, workers: int) -> str:
        return server_section(
            "greet",
            listen=f"127.0.0.1:{port}",
            handler=f"{handlers}:Greeting",
            workers=workers,
            options={"greeting": greeting},
        )

    daemon = start_daemon(head + config("old", 2))
    inode = listener_inode(daemon.pid, port)
    hammer = Hammer(port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as in_flight:
        assert echo_on(in_flight, b"a\n") == b"old a\n"
        hammer.start()
        try:
            wait_for(lambda: len(hammer.replies) >= 20)
            daemon.config_path.write_text(head + config("new", 3))
            assert result(path, "reload") == plan(changed=["greet"])
            wait_for(lambda: hammer.replies.count(b"new n\n") >= 20)
        finally:
            hammer.stop()
        assert hammer.failures == [], "no connect is refused or reset across the reload"
        switch = hammer.replies.index(b"new n\n")
        assert set(hammer.replies[:switch]) == {b"old n\n"}
        assert set(hammer.replies[switch:]) == {b"new n\n"}, "new requests get the new settings"
        # The request in flight runs on the old pool, with the old settings, to its end.
        assert echo_on(in_flight, b"b\n") == b"old b\n"
    assert listener_inode(daemon.pid, port) == inode
    assert server_status(path, "greet")["workers"] == 3
    assert server_status(path, "greet")["errors"] == 0

    # A connection waiting in the listener's backlog across a reload is not lost.
    assert result(path, "pause", server="greet")["state"] == "paused"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
        waiting.sendall(b"y\n")
        daemon.config_path.write_text(head + config("newer", 3))
        assert result(path, "reload") == plan(changed=["greet"])
        assert server_status(path, "greet")["state"] == "paused", "a reload does not resume"
        assert result(path, "resume", server="greet")["state"] == "running"
        assert echo_on(waiting, b"") == b"newer y\n"
    assert listener_inode(daemon.pid, port) == inode


def test_sighup_reloads_the_config_file(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    first, second = free_port(), free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("first", first))
    daemon.config_path.write_text(head + echo_server("second", second))
    daemon.send(signal.SIGHUP)
    done = daemon.wait_event("reload_done")
    assert (done["added"], done["removed"]) == (["second"], ["first"])
    assert echo_roundtrip(second) == b"hello\n"
    assert refused(first)
    wait_for(lambda: list(servers_status(path)) == ["second"])
    # The same over the control socket: one event per reload, whoever asked.
    daemon.config_path.write_text(head + echo_server("first", first))
    assert result(path, "reload")["added"] == ["first"]
    assert len(daemon.find("reload_done")) == 2


def test_invalid_config_is_refused_and_nothing_changes(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port, extra_port = free_port(), free_port()
    head = daemon_section(tmp_path)
    echo = echo_server("echo", port, workers=2)
    good = head + echo
    daemon = start_daemon(good)
    before = servers_status(path)
    config_before = result(path, "config")

    # Each has a valid addition next to the invalid part: it must not be applied either.
    extra = echo_server("extra", extra_port)
    loud = head.replace('log_level = "debug"', 'log_level = "loud"')
    invalid = {
        "unknown key": (
            head + extra + echo_server("echo", port, wrokers=3),
            "servers.echo.wrokers: unknown key",
        ),
        "bad value": (
            head + extra + echo_server("echo", port, workers=0),
            "servers.echo.workers: must be an integer >= 1",
        ),
        "bad daemon value": (loud + extra + echo, "daemon.log_level: must be one of"),
        "TOML syntax": (head + extra + "[servers.echo\nlisten = 1\n", "TOML syntax error at line"),
    }
    for case, (text, expected) in invalid.items():
        daemon.config_path.write_text(text)
        message = error(path, "reload")
        assert message.startswith("reload refused, nothing changed: "), message
        assert expected in message, (case, message)
        assert servers_status(path) == before, case
        assert result(path, "config") == config_before, case
        assert refused(extra_port)

    daemon.send(signal.SIGHUP)  # the same through the signal
    failed = daemon.wait_event("reload_failed")
    assert "TOML syntax error" in failed["error"]
    assert servers_status(path) == before
    assert echo_roundtrip(port) == b"hello\n"
    daemon.config_path.write_text(good)
    assert result(path, "reload") == plan(unchanged=["echo"])


def test_reload_that_cannot_bind_is_refused_whole(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port, other, taken = free_port(), free_port(), free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("echo", port, workers=2) + echo_server("other", other))
    before = servers_status(path)
    config_before = result(path, "config")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        # echo changed, other removed, blocked added: blocked cannot bind, so none of it happens.
        daemon.config_path.write_text(
            head + echo_server("echo", port, workers=5) + echo_server("blocked", taken)
        )
        message = error(path, "reload")
        assert f"cannot bind servers.blocked to 127.0.0.1:{taken}" in message, message
        assert daemon.wait_event("reload_failed")["error"] == message  # logged as on SIGHUP
        assert servers_status(path) == before
        assert result(path, "config") == config_before
    assert echo_roundtrip(port) == b"hello\n"
    assert echo_roundtrip(other) == b"hello\n"
    assert not daemon.find("server_removed")


def test_daemon_settings_live_and_needing_a_restart(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    body = echo_server("echo", port)
    first_pidfile, second_pidfile = tmp_path / "first.pid", tmp_path / "second.pid"
    daemon = start_daemon(daemon_section(tmp_path, pidfile=str(first_pidfile)) + body)
    elsewhere = f"{tmp_path}/elsewhere.sock"
    changed = daemon_section(tmp_path, log_level="warning", pidfile=str(second_pidfile)).replace(
        f'"{tmp_path}/control.sock"', f'"{elsewhere}"'
    )
    daemon.config_path.write_text(changed + body)
    reply = result(path, "reload")
    assert reply == plan(
        unchanged=["echo"],
        daemon_applied=["log_level"],
        daemon_needs_restart=["control_socket", "pidfile"],
    )
    assert result(path, "ping") == "pong", "the control socket stays where it was"
    assert not Path(elsewhere).exists()
    # Not applied, so still to be applied: a second reload of the same file says so again, and
    # the running config shows the socket in use.
    again = result(path, "reload")
    assert again["daemon_needs_restart"] == ["control_socket", "pidfile"]
    assert again["daemon_applied"] == []
    assert f'control_socket = "{tmp_path}/control.sock"' in result(path, "config")

    # log_level = "warning" is in force: an info event (server_paused) is no longer written,
    # while an error event (reload_failed) that the loop logs after it is.
    assert result(path, "pause", server="echo")["state"] == "paused"
    daemon.config_path.write_text("this is not toml")
    daemon.send(signal.SIGHUP)
    daemon.wait_event("reload_failed")
    assert not daemon.find("server_paused")
    assert result(path, "resume", server="echo")["state"] == "running"
    assert echo_roundtrip(port) == b"hello\n"
    # The pidfile in use is the one removed on the way out, and none was written elsewhere.
    assert first_pidfile.read_text() == f"{daemon.pid}\n"
    assert daemon.stop() == 0
    assert not first_pidfile.exists() and not second_pidfile.exists()


def test_renaming_a_server_on_the_same_address(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("before", port))
    daemon.config_path.write_text(head + echo_server("after", port))
    reply: Any = result(path, "reload")
    assert reply == plan(added=["after"], removed=["before"])
    assert echo_roundtrip(port) == b"hello\n"
    assert list(servers_status(path)) == ["after"]


def test_changing_the_backlog_of_a_server(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("echo", port))
    daemon.config_path.write_text(head + echo_server("echo", port, request_queue_size=16))
    assert result(path, "reload") == plan(changed=["echo"])
    assert echo_roundtrip(port) == b"hello\n"


def test_reload_keeps_a_stopped_server_stopped(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port = free_port()
    head = daemon_section(tmp_path)
    daemon = start_daemon(head + echo_server("echo", port, workers=2))
    assert result(path, "stop", server="echo")["done"] == "stopping"
    wait_for(lambda: server_status(path, "echo")["state"] == "stopped")
    daemon.config_path.write_text(head + echo_server("echo", port, workers=3))
    assert result(path, "reload") == plan(changed=["echo"])
    assert server_status(path, "echo")["state"] == "stopped"
    assert refused(port)


def test_server_added_back_while_its_predecessor_drains(start_daemon, tmp_path: Path) -> None:
    path = control_path(tmp_path)
    port, other = free_port(), free_port()
    head = daemon_section(tmp_path)
    slow = echo_server("slow", port, concurrency="fork", workers=1)
    daemon = start_daemon(head + slow + echo_server("other", other))
    [old_worker] = [w["pid"] for w in server_status(path, "slow")["worker_processes"]]
    with held_connection(port) as in_flight:
        daemon.config_path.write_text(head + echo_server("other", other))
        assert result(path, "reload") == plan(removed=["slow"], unchanged=["other"])
        daemon.config_path.write_text(head + slow + echo_server("other", other))
        assert result(path, "reload") == plan(added=["slow"], unchanged=["other"])
        assert echo_on(in_flight, b"old pool\n") == b"old pool\n"
    assert echo_roundtrip(port) == b"hello\n"
    assert daemon.stop() == 0
    # Graceful shutdown waits for every pool it knows of to be reaped.
    assert daemon.find("worker_exited", worker_pid=old_worker), "the old worker was retired"
