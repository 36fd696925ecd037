"""inetd parity: exec services over TCP and UDP, and xinetd's per-service limits."""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for


def server(name: str, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: keys}})


def talk(port: int, data: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if data:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            # Refused before we finished sending: what it sent (a banner) is still readable.
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


# -- exec services ---------------------------------------------------------------------------


def test_cat_as_an_exec_service_echoes(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    daemon = start_daemon(
        daemon_section(tmp_path) + server("cat", listen=f"127.0.0.1:{port}", command=["cat"])
    )
    assert talk(port, b"through a program\n") == b"through a program\n"
    payload = os.urandom(256 * 1024)
    assert talk(port, payload) == payload
    exited = daemon.wait_event("exec_exited", server="cat")
    assert exited["exit_code"] == 0
    status = daemon.control("status", server="cat")["result"]["servers"]["cat"]
    assert status["concurrency"] == "exec"
    wait_for(lambda: daemon.control("status")["result"]["servers"]["cat"]["requests"] == 2)
    assert daemon.stop() == 0


def test_the_program_sees_its_environment(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    os.environ["SELECTD_TEST_PASSED"] = "from the daemon"
    try:
        config = daemon_section(tmp_path) + server(
            "env",
            listen=f"127.0.0.1:{port}",
            command=["sh", "-c", "env; pwd; ulimit -n; echo oops >&2; exit 3"],
            env={"GREETING": "hello there"},
            passenv=["SELECTD_TEST_PASSED"],
            cwd=str(tmp_path),
            rlimit_nofile=77,
        )
        daemon = start_daemon(config)
    finally:
        del os.environ["SELECTD_TEST_PASSED"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        local_port = s.getsockname()[1]
        s.shutdown(socket.SHUT_WR)
        out = s.makefile("rb").read().decode()
    lines = out.splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(local_port)
    assert env["SERVER_NAME"] == "env"
    assert env["GREETING"] == "hello there"
    assert env["SELECTD_TEST_PASSED"] == "from the daemon"
    assert "SELECTD_CONFIG" not in env and "HOME" not in env, "nothing else leaks in"
    assert str(tmp_path) in lines, "cwd"
    assert "77" in lines, "rlimit_nofile"
    line = daemon.wait_event("exec_stderr", server="env")
    assert line["line"] == "oops"
    exited = daemon.wait_event("exec_exited", server="env")
    assert exited["exit_code"] == 3
    assert daemon.stop() == 0


def test_each_program_runs_in_its_own_process_group(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "pg", listen=f"127.0.0.1:{port}", command=["sh", "-c", "ps -o pgid= -p $$"]
    )
    daemon = start_daemon(config)
    pgid = int(talk(port).strip())
    child = daemon.wait_event("exec_exited", server="pg")["child_pid"]
    assert pgid == child != os.getpgid(daemon.pid)
    assert daemon.stop() == 0


def test_datagram_exec_service_gets_the_socket_and_waits(start_daemon, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    # The program reads one datagram from the socket on its stdin and answers it, as a
    # `wait` service does; the daemon leaves the socket alone until it exits.
    script = tmp_path / "udp_reply.py"
    script.write_text(
        "import os, socket, sys\n"
        "s = socket.socket(fileno=0)\n"
        "data, peer = s.recvfrom(2048)\n"
        "blocking = os.get_blocking(0)  # as inetd gives it: a wait for the next one waits\n"
        "s.sendto(b'pid %d %r got ' % (os.getpid(), blocking) + data, peer)\n"
        "s.detach()\n"
    )
    import sys

    config = daemon_section(tmp_path) + server(
        "udp",
        listen=f"127.0.0.1:{port}",
        socket_type="dgram",
        command=[sys.executable, str(script)],
    )
    daemon = start_daemon(config)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        answers = set()
        for i in range(3):
            s.sendto(f"datagram {i}".encode(), ("127.0.0.1", port))
            reply = s.recv(2048)
            assert reply.endswith(f"True got datagram {i}".encode()), reply
            answers.add(reply.split()[1])
    assert len(answers) == 3, "one program per wait cycle"
    wait_for(lambda: len(daemon.find("exec_exited", server="udp")) == 3)
    # Between programs the daemon's listener is non-blocking again, as its loop needs it.
    assert udp_listener_flags(daemon.pid, port) & os.O_NONBLOCK
    assert daemon.stop() == 0


def udp_listener_flags(pid: int, port: int) -> int:
    """The file status flags of `pid`'s descriptor for the UDP socket bound to `port`."""
    with open("/proc/net/udp") as f:
        inodes = {
            fields[9]
            for fields in (line.split() for line in list(f)[1:])
            if int(fields[1].split(":")[1], 16) == port
        }
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                return int(info.read().split()[3], 8)
    raise AssertionError(f"no UDP socket on port {port} in pid {pid}")


def test_a_wait_service_checks_the_sender_before_the_program_reads(
    start_daemon, tmp_path: Path
) -> None:
    # The program would read the datagram unchecked: the daemon peeks at its sender first.
    port = free_port(socket.SOCK_DGRAM)
    config = daemon_section(tmp_path) + server(
        "udp",
        listen=f"127.0.0.1:{port}",
        socket_type="dgram",
        command=["/bin/cat"],
        deny=["127.0.0.0/8"],
    )
    daemon = start_daemon(config)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"let me in", ("127.0.0.1", port))
        daemon.wait_event("request_denied", server="udp")
    figures = daemon.control("status", server="udp")["result"]["servers"]["udp"]
    assert (figures["denied"], figures["requests"]) == (1, 0)
    assert daemon.stop() == 0
    assert not daemon.find("exec_exited", server="udp"), "the program never ran"


def test_a_wait_program_that_keeps_failing_is_rested_not_restarted_for_ever(
    start_daemon, tmp_path: Path
) -> None:
    # A program that cannot run leaves its datagram unread: without inetd's loop guard the
    # daemon would start it again at once, hundreds of times a second, for ever.
    port = free_port(socket.SOCK_DGRAM)
    config = daemon_section(tmp_path) + server(
        "broken", listen=f"127.0.0.1:{port}", socket_type="dgram", command=["/nonexistent/prog"]
    )
    daemon = start_daemon(config)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"one datagram", ("127.0.0.1", port))
    rest = daemon.wait_event("service_disabled", server="broken")
    assert (rest["reason"], rest["failures"], rest["seconds"]) == ("looping", 10, 10.0)
    assert daemon.stop() == 0
    assert len(daemon.find("exec_exited", server="broken")) == 10


def test_a_reload_that_changes_the_server_lets_running_programs_finish(
    start_daemon, tmp_path: Path
) -> None:
    port = free_port()
    head = daemon_section(tmp_path)

    def config(env: dict[str, str]) -> str:
        command = ["sh", "-c", "sleep 1; echo finished $X"]
        return head + server("slow", listen=f"127.0.0.1:{port}", command=command, env=env)

    daemon = start_daemon(config({"X": "old"}))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        daemon.wait_event("exec_started", server="slow")
        daemon.config_path.write_text(config({"X": "new"}))
        assert daemon.control("reload")["result"]["changed"] == ["slow"]
        # New settings for new requests; the one running keeps its program to the end.
        assert client.makefile("rb").readline() == b"finished old\n"
    assert talk(port) == b"finished new\n"
    assert daemon.stop() == 0


def test_exec_children_are_terminated_on_stop(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path, shutdown_timeout=5) + server(
        "sleepy", listen=f"127.0.0.1:{port}", command=["sleep", "60"]
    )
    daemon = start_daemon(config)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    wait_for(lambda: len([c for c in daemon.children() if c.name() == "sleep"]) == 3)
    sleepers = [c.pid for c in daemon.children()]
    started = time.monotonic()
    assert daemon.stop() == 0, "SIGTERM ends `sleep`, so the drain completes"
    assert time.monotonic() - started < 5
    for pid in sleepers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    exits = daemon.find("exec_exited", server="sleepy")
    assert len(exits) == 3 and all(e["signal"] == "SIGTERM" for e in exits)
    for c in clients:
        c.close()


def test_exec_child_ignoring_sigterm_is_killed_at_the_timeout(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path, shutdown_timeout=0.5) + server(
        "stubborn",
        listen=f"127.0.0.1:{port}",
        command=["sh", "-c", "trap '' TERM; echo ready; sleep 60 & wait"],
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.makefile("rb").readline() == b"ready\n"
        daemon.send(signal.SIGTERM)
        assert daemon.proc.wait(15) == 1, "it had to be forced"
    exits = daemon.find("exec_exited", server="stubborn")
    assert exits and exits[0]["signal"] == "SIGKILL"


def test_a_program_that_leaves_something_running_does_not_hold_up_the_loop(
    start_daemon, tmp_path: Path
) -> None:
    # The program exits at once; what it started in the background keeps its stderr open.
    # The loop must not wait on that pipe: the other server answers at once meanwhile.
    bg, echo = free_port(), free_port()
    config = daemon_section(tmp_path)
    config += server(
        "bg",
        listen=f"127.0.0.1:{bg}",
        command=["sh", "-c", "sleep 3 </dev/null >/dev/null & echo started"],
    )
    config += server("echo", listen=f"127.0.0.1:{echo}", handler="echo")
    daemon = start_daemon(config)
    assert talk(bg) == b"started\n"
    # Round trips for a second from the program's exit on: none may wait on the loop.
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        started = time.monotonic()
        assert echo_roundtrip(echo) == b"hello\n"
        assert time.monotonic() - started < 0.5, "the loop waited on a pipe a grandchild holds"
    assert daemon.wait_event("exec_exited", server="bg")["exit_code"] == 0
    assert daemon.stop() == 0


def test_a_program_that_cannot_be_started_frees_its_per_source_slot(
    start_daemon, tmp_path: Path
) -> None:
    # Out of descriptors between accept and spawn (its stderr pipe): that request fails, and
    # the client's per_source slot comes back with it.
    port = free_port()
    daemon = start_daemon(
        daemon_section(tmp_path)
        + server("cat", listen=f"127.0.0.1:{port}", command=["cat"], per_source=1)
    )
    soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (in_use + 1, hard))  # accept, no pipe
    try:
        assert talk(port, b"x\n") == b""
        daemon.wait_event("request_failed", server="cat")
    finally:
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert talk(port, b"again\n") == b"again\n"
    assert not daemon.find("request_refused", server="cat")
    assert daemon.stop() == 0


def test_a_program_that_cannot_start_is_reported(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "missing", listen=f"127.0.0.1:{port}", command=["/no/such/program"]
    )
    daemon = start_daemon(config)
    assert talk(port) == b""
    assert "cannot run" in daemon.wait_event("exec_stderr", server="missing")["line"]
    assert daemon.wait_event("exec_exited", server="missing")["exit_code"] == 127
    status = daemon.control("status")["result"]["servers"]["missing"]
    assert status["errors"] == 1
    assert daemon.stop() == 0


# -- per-service limits ----------------------------------------------------------------------


def _hold(port: int, n: int) -> list[socket.socket]:
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"x")
        held.append(s)
    return held


@pytest.mark.parametrize("mode", ["thread", "exec"])
def test_instances_limit_refuses_beyond_n(start_daemon, tmp_path: Path, mode: str) -> None:
    port = free_port()
    keys: dict[str, object] = {"listen": f"127.0.0.1:{port}", "instances": 2}
    keys.update(
        {"handler": "echo", "concurrency": "thread"} if mode == "thread" else {"command": ["cat"]}
    )
    keys["banner_fail"] = "busy, try later\n"
    daemon = start_daemon(daemon_section(tmp_path) + server("limited", **keys))
    held = _hold(port, 2)
    for s in held:
        assert s.recv(1) == b"x"  # both are being served
    assert talk(port) == b"busy, try later\n", "the third is refused with the banner"
    refused = daemon.wait_event("request_refused", server="limited")
    assert refused["reason"] == "instances"
    for s in held:
        s.close()
    wait_for(lambda: _answers(port))
    status = daemon.control("status")["result"]["servers"]["limited"]
    assert status["refused"]["instances"] >= 1
    metrics = daemon.control("metrics")["result"]
    assert 'selectd_refused_total{reason="instances",server="limited"}' in metrics
    assert daemon.stop() == 0


def _answers(port: int) -> bool:
    return talk(port, b"again\n") == b"again\n"


def test_per_source_limit(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "per", listen=f"127.0.0.1:{port}", handler="echo", per_source=2
    )
    daemon = start_daemon(config)
    held = _hold(port, 2)
    for s in held:
        assert s.recv(1) == b"x"
    assert talk(port, b"third\n") == b""
    # Another source address (127.0.0.2 is loopback too) has its own allowance.
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(b"other source\n")
        assert s.recv(100) == b"other source\n"
    assert daemon.wait_event("request_refused", server="per")["reason"] == "per_source"
    held[0].close()
    wait_for(lambda: _answers(port))
    for s in held[1:]:
        s.close()
    assert daemon.stop() == 0


def test_cps_disables_the_service_then_reenables_it(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    other = free_port()
    config = daemon_section(tmp_path) + server(
        "cps", listen=f"127.0.0.1:{port}", handler="echo", cps=[5, 1]
    )
    config += server("other", listen=f"127.0.0.1:{other}", handler="echo")
    daemon = start_daemon(config)
    results = [talk(port, b"x\n") for _ in range(6)]
    assert results == [b"x\n"] * 5 + [b""], "the sixth within the second trips the limit"
    # Disabled now: a new connection waits unanswered (and is refused at re-enabling).
    with pytest.raises(TimeoutError):
        talk(port, b"x\n", timeout=0.3)
    disabled = daemon.wait_event("service_disabled", server="cps")
    assert (disabled["limit"], disabled["seconds"]) == (5, 1)
    assert echo_roundtrip(other) == b"hello\n", "other servers are unaffected"
    daemon.wait_event("service_enabled", server="cps", timeout=5)
    wait_for(lambda: _answers(port), 5)
    assert daemon.stop() == 0


def test_access_times_outside_the_window_refuse(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    now = time.localtime()
    minute = now.tm_hour * 60 + now.tm_min
    # A one-minute window twelve hours away from now: closed for the whole test.
    far = (minute + 720) % 1440
    window = f"{far // 60:02d}:{far % 60:02d}-{far // 60:02d}:{far % 60:02d}"
    open_port = free_port()
    config = daemon_section(tmp_path) + server(
        "closed", listen=f"127.0.0.1:{port}", handler="echo", access_times=[window]
    )
    config += server(
        "open", listen=f"127.0.0.1:{open_port}", handler="echo", access_times=["00:00-23:59"]
    )
    daemon = start_daemon(config)
    assert talk(port, b"knock\n") == b""
    assert daemon.wait_event("request_refused", server="closed")["reason"] == "access_times"
    assert talk(open_port, b"knock\n") == b"knock\n"
    assert daemon.stop() == 0


def test_limits_under_concurrent_load(start_daemon, tmp_path: Path) -> None:
    port = free_port()
    config = daemon_section(tmp_path, log_level="warning") + server(
        "busy",
        listen=f"127.0.0.1:{port}",
        command=["sh", "-c", "sleep 0.3; cat"],
        instances=4,
    )
    daemon = start_daemon(config)
    outcomes: list[bytes] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            result = talk(port, b"ok\n")
        except OSError:
            result = b""  # refused: closed unread, which may reach us as a reset
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    served = outcomes.count(b"ok\n")
    assert 4 <= served < 16 and outcomes.count(b"") == 16 - served, outcomes
    status = daemon.control("status")["result"]["servers"]["busy"]
    assert status["refused"]["instances"] == 16 - served
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a program's user needs root")
def test_an_unknown_exec_user_names_the_servers_key(start_daemon, tmp_path: Path) -> None:
    config = daemon_section(tmp_path) + server(
        "tftp.v4", listen=f"127.0.0.1:{free_port()}", command=["cat"], user="no-such-user-zz"
    )
    daemon = start_daemon(config, ready=False)
    assert daemon.proc.wait(15) == 1
    assert """servers."tftp.v4".user: no such user 'no-such-user-zz'""" in daemon.log_text()


def test_exec_service_runs_as_its_user_and_group(start_daemon, tmp_path: Path) -> None:
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    port = free_port()
    config = daemon_section(tmp_path) + server(
        "who", listen=f"127.0.0.1:{port}", command=["id"], user="nobody", group=group
    )
    daemon = start_daemon(config)
    out = talk(port).decode()
    assert f"uid={nobody.pw_uid}(" in out and f"gid={nobody.pw_gid}(" in out, out
    assert "groups=" in out and "(root)" not in out, "no supplementary group of root's is kept"
    assert daemon.stop() == 0
