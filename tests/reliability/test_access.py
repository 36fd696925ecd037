"""Promise 9: access control holds.

- The control socket is mode 0600 in a 0700 directory, and even when an operator loosens both,
  the daemon serves no uid but its own and root (SO_PEERCRED).
- A handler's `self.server` leads nowhere near the supervisor or the control commands.
- allow/deny rules hold for IPv4 clients, IPv6 clients and IPv4 clients seen through an IPv6
  socket (::ffff:127.0.0.1). The IPv4-mapped listener is bound to ::ffff:127.0.0.1 rather than
  to [::], which would show the same client addresses but listen on every interface.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import daemon_section, echo_roundtrip, free_port
from tests.reliability.conftest import ask, server_section, short_tempdir, status


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short, world-traversable directory whose `run/` subdirectory the daemon creates."""
    base = short_tempdir("selectd-acl-")
    os.chmod(base, 0o755)
    try:
        yield base / "run"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the control socket ----------------------------------------------------------------------


def connect_as(uid: int, gid: int, path: str) -> str:
    """In a forked child with `uid`/`gid`: connect to `path` and ping. What happened, as text:
    'EACCES', 'closed' (accepted, then closed unanswered), or the reply line."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, and always os._exit
        outcome = "child failed"
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                s.sendall(b'{"command": "ping"}\n')
                data = s.recv(4096)
                outcome = data.decode(errors="replace").strip() if data else "closed"
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):  # closed before our send
                    outcome = "closed"
                else:
                    outcome = errno.errorcode.get(exc.errno or 0, repr(exc))
            os.write(writer, outcome.encode())
        finally:
            os._exit(0)
    os.close(writer)
    try:
        with os.fdopen(reader, "rb") as f:
            outcome = f.read().decode()
    finally:
        os.waitpid(pid, 0)
    return outcome


def test_control_socket_is_0600_in_a_0700_directory(start_daemon, run_dir: Path) -> None:
    path = run_dir / "control.sock"
    daemon = start_daemon(daemon_section(run_dir.parent, control_socket=str(path)))
    assert mode_of(run_dir) == 0o700, oct(mode_of(run_dir))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert mode_of(path) == 0o600, oct(mode_of(path))
    assert os.stat(path).st_uid == os.getuid()
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_control_socket_refuses_other_uids(start_daemon, run_dir: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    path = run_dir / "control.sock"
    daemon = start_daemon(daemon_section(run_dir.parent, control_socket=str(path)))
    uid, gid = nobody.pw_uid, nobody.pw_gid

    # Only the socket's own mode in the way: the kernel refuses the connect.
    os.chmod(run_dir, 0o755)
    assert connect_as(uid, gid, str(path)) == "EACCES"
    # Socket and directory wide open: the daemon itself refuses (SO_PEERCRED), unanswered.
    os.chmod(path, 0o666)
    assert connect_as(uid, gid, str(path)) == "closed"
    denied = daemon.wait_event("control_denied")
    assert denied["uid"] == uid and denied["level"] == "warning"
    # Root and the daemon's own uid are still served.
    assert daemon.control("ping") == {"ok": True, "result": "pong"}
    assert json.loads(connect_as(os.getuid(), os.getgid(), str(path)))["result"] == "pong"
    assert daemon.stop() == 0


# -- handlers and the supervisor ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inline", "thread", "fork"])
def test_handler_server_object_holds_no_way_to_the_supervisor(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    """Walk `self.server`'s attributes one level: no Supervisor, ControlServer, control
    connection, signal wakeup or command table among them."""
    port = free_port()
    keys: dict[str, object] = {"workers": 1} if mode != "inline" else {}
    config = daemon_section(tmp_path) + server_section(
        "reach",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Reach",
        concurrency=mode,
        options={"depth": 1},
        **keys,
    )
    daemon = start_daemon(config)
    assert json.loads(ask(port, b"?\n")) == []
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    "mode",
    [
        "inline",
        "thread",
        pytest.param("fork"),
    ],
)
def test_handler_server_object_holds_no_way_to_the_supervisor_two_levels_down(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    """The same walk, two levels: through self.server.dispatcher (the pool) and the rest."""
    port = free_port()
    keys: dict[str, object] = {"workers": 1} if mode != "inline" else {}
    config = daemon_section(tmp_path) + server_section(
        "reach",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Reach",
        concurrency=mode,
        options={"depth": 2},
        **keys,
    )
    daemon = start_daemon(config)
    found = json.loads(ask(port, b"?\n"))
    assert daemon.stop() == 0
    assert found == []


# -- allow / deny ----------------------------------------------------------------------------

MAPPED = "[::ffff:127.0.0.1]"  # an IPv6 socket that sees 127.0.0.1 as ::ffff:127.0.0.1


def acl_cases(v6: bool) -> dict[str, tuple[str, str, dict[str, list[str]], bool]]:
    """name -> (listen host, client host, rules, admitted?)."""
    cases = {
        "v4-deny": ("127.0.0.1", "127.0.0.1", {"deny": ["127.0.0.0/8"]}, False),
        "v4-allow-other": ("127.0.0.1", "127.0.0.1", {"allow": ["10.0.0.0/8"]}, False),
        "v4-allow": (
            "127.0.0.1",
            "127.0.0.1",
            {"allow": ["127.0.0.1/32"], "deny": ["10.0.0.0/8"]},
            True,
        ),
        "v4-deny-wins": (
            "127.0.0.1",
            "127.0.0.1",
            {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]},
            False,
        ),
        "mapped-deny": (MAPPED, "127.0.0.1", {"deny": ["127.0.0.0/8"]}, False),
        "mapped-allow": (MAPPED, "127.0.0.1", {"allow": ["127.0.0.1/32"]}, True),
        "mapped-allow-v6-only": (MAPPED, "127.0.0.1", {"allow": ["::1/128"]}, False),
    }
    if v6:
        cases |= {
            "v6-allow": ("[::1]", "::1", {"allow": ["::1/128"]}, True),
            "v6-deny": ("[::1]", "::1", {"deny": ["::1/128"]}, False),
            "v6-allow-v4-only": ("[::1]", "::1", {"allow": ["127.0.0.0/8"]}, False),
            "v6-deny-v4": ("[::1]", "::1", {"deny": ["127.0.0.0/8"]}, True),
        }
    return cases


def test_allow_and_deny_hold_for_ipv4_ipv6_and_mapped_addresses(
    start_daemon, tmp_path: Path
) -> None:
    cases = acl_cases(has_ipv6_loopback())
    ports = {name: free_port() for name in cases}
    config = daemon_section(tmp_path, log_level="info")
    for name, (listen, _client, rules, _admitted) in cases.items():
        config += server_section(name, listen=f"{listen}:{ports[name]}", handler="echo", **rules)
    daemon = start_daemon(config)
    outcomes = {
        name: echo_roundtrip(ports[name], b"knock\n", host=client) == b"knock\n"
        for name, (_listen, client, _rules, _admitted) in cases.items()
    }
    assert outcomes == {name: case[3] for name, case in cases.items()}
    servers = status(daemon)["servers"]
    for name, (_listen, _client, _rules, admitted) in cases.items():
        assert servers[name]["denied"] == (0 if admitted else 1), (name, servers[name])
    mapped = [e for e in daemon.find("request_denied", server="mapped-deny")]
    assert mapped and mapped[0]["client"].startswith("[::ffff:127.0.0.1]:"), mapped
    assert daemon.stop() == 0


@pytest.mark.parametrize("listen_host", [MAPPED, "127.0.0.1"])
def test_deny_written_as_an_ipv4_mapped_network_blocks_mapped_clients(
    start_daemon, tmp_path: Path, listen_host: str
) -> None:
    # The same rule for a client seen as ::ffff:127.0.0.1 (an IPv6 socket) and as 127.0.0.1.
    port = free_port()
    config = daemon_section(tmp_path) + server_section(
        "mapped", listen=f"{listen_host}:{port}", handler="echo", deny=["::ffff:127.0.0.0/104"]
    )
    daemon = start_daemon(config)
    reply = echo_roundtrip(port, b"knock\n")
    assert daemon.stop() == 0
    assert reply == b"", f"a client of {listen_host} got past deny = ['::ffff:127.0.0.0/104']"
