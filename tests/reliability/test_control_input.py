"""Promise 5: bad control input gets an error or a closed connection, and changes nothing.

Random bytes, wrong JSON shapes, unknown commands and bad arguments, truncated and oversized
lines, a hundred clients at once, a client that never reads its replies: each is answered with
an error or cut off, and the daemon and its listeners carry on as before. One daemon serves the
whole module (hypothesis reuses it across examples); every test ends by checking it is unhurt.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, daemon_section, echo_roundtrip, free_port, wait_for
from tests.reliability.conftest import server_section, status

# Commands a fuzzer must never send well-formed: they would change the daemon under test.
CHANGING = {"stop", "pause", "shutdown", "reload", "upgrade"}
HARMLESS = ["ping", "status", "config", "metrics", "start", "resume"]
FUZZ = settings(max_examples=50, deadline=None, database=None)


@pytest.fixture(scope="module")
def daemon(module_launch: Callable[..., Daemon]) -> Daemon:
    echo_port, fork_port = free_port(), free_port()
    config = daemon_section("{dir}", log_level="info")  # type: ignore[arg-type]
    config += server_section("echo", listen=f"127.0.0.1:{echo_port}", handler="echo")
    config += server_section(
        "forked", listen=f"127.0.0.1:{fork_port}", handler="echo", concurrency="fork", workers=2
    )
    started = module_launch(config)
    started.ports = {"echo": echo_port, "forked": fork_port}  # type: ignore[attr-defined]
    return started


@pytest.fixture(autouse=True)
def unhurt(daemon: Daemon) -> Any:
    """After each test: same process, every server running and answering, control answering."""
    before = status(daemon)
    yield
    assert daemon.proc.poll() is None, daemon.log_text()[-2000:]
    after = status(daemon)
    assert after["daemon"]["pid"] == before["daemon"]["pid"] == daemon.pid
    assert after["daemon"]["phase"] == "running"
    for name, figures in after["servers"].items():
        assert figures["state"] == "running", (name, figures)
        assert figures["listen"] == before["servers"][name]["listen"]
        assert figures["workers"] == before["servers"][name]["workers"]
    # The very same fork workers: none killed, replaced or restarted by the bad input.
    pids = [{w["pid"] for w in f["servers"]["forked"]["worker_processes"]} for f in (before, after)]
    assert len(pids[1]) == 2 and pids[0] == pids[1], pids
    for port in daemon.ports.values():  # type: ignore[attr-defined]
        assert echo_roundtrip(port, b"unhurt\n") == b"unhurt\n"


class Connection:
    """One control connection: send raw bytes, read reply lines."""

    def __init__(self, daemon: Daemon, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(daemon.control_socket)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Any:
        """The next reply as an object; None when the daemon closed the connection."""
        line = self.reader.readline()
        return json.loads(line) if line else None

    def ask(self, request: Any) -> Any:
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def assert_error(reply: Any) -> str:
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    assert isinstance(reply.get("error"), str) and reply["error"], reply
    return reply["error"]


def assert_well_formed(reply: Any) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert set(reply) == {"ok", "result"}, reply
    else:
        assert_error(reply)


# -- fuzzing ---------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_get_one_error_per_line(daemon: Daemon, data: bytes) -> None:
    line = data.replace(b"\n", b"")
    conn = Connection(daemon)
    try:
        conn.send(line + b"\n")
        reply = conn.reply()
        if line.strip().startswith(b"{") and b"command" in line:
            assert_well_formed(reply)  # a valid request by chance is allowed an answer
        else:
            assert_error(reply)
        assert conn.ask({"command": "ping"}) == {"ok": True, "result": "pong"}, (
            "a bad line does not end the connection"
        )
    finally:
        conn.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
command_names = st.sampled_from(HARMLESS) | st.text(max_size=12).filter(
    lambda name: name not in CHANGING
)
requests = (
    json_values
    | st.fixed_dictionaries({"command": json_values})
    | st.fixed_dictionaries(
        {"command": command_names},
        optional={"server": json_values, "timeout": json_values, "extra": json_values},
    )
)


@FUZZ
@given(request=requests)
def test_wrong_json_shapes_get_an_error_or_a_well_formed_answer(
    daemon: Daemon, request: Any
) -> None:
    conn = Connection(daemon)
    try:
        reply = conn.ask(request)
        known = isinstance(request, dict) and request.get("command") in HARMLESS
        if not known:
            error = assert_error(reply)
            if isinstance(request, dict) and isinstance(request.get("command"), str):
                assert "unknown command" in error
        else:
            assert_well_formed(reply)
    finally:
        conn.close()


# -- unknown commands and bad arguments ------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"command": "selfdestruct"}, "unknown command"),
        ({"command": ""}, "unknown command"),
        ({"command": 7}, '"command" string'),
        ({"commands": "ping"}, '"command" string'),
        ([{"command": "ping"}], "JSON object"),
        ({"command": "stop"}, '"server"'),
        ({"command": "stop", "server": 5}, '"server" must be a string'),
        ({"command": "stop", "server": ["echo"]}, '"server" must be a string'),
        ({"command": "stop", "server": "nonexistent"}, "no server named"),
        ({"command": "pause", "server": None}, '"server"'),
        ({"command": "resume", "server": "echo"}, "not paused"),
        ({"command": "start", "server": "echo"}, "already running"),
        ({"command": "status", "server": "nonexistent"}, "no server named"),
        ({"command": "shutdown", "timeout": "soon"}, '"timeout"'),
        ({"command": "shutdown", "timeout": -1}, '"timeout"'),
        ({"command": "shutdown", "timeout": True}, '"timeout"'),
        ({"command": "shutdown", "timeout": float("inf")}, '"timeout"'),
        ({"command": "shutdown", "timeout": float("nan")}, '"timeout"'),
    ],
)
def test_bad_commands_and_arguments_get_errors(daemon: Daemon, request_: Any, message: str) -> None:
    conn = Connection(daemon)
    try:
        assert message in assert_error(conn.ask(request_))
    finally:
        conn.close()


# -- broken lines ----------------------------------------------------------------------------


def test_truncated_lines_are_cut_off_or_completed(daemon: Daemon) -> None:
    # Half a request, then EOF: closed without an answer.
    conn = Connection(daemon)
    conn.send(b'{"command": "pi')
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.reply() is None
    conn.close()
    # Half a request, then the rest later: one answer, to the whole line.
    conn = Connection(daemon)
    conn.send(b'{"command": "pi')
    conn.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        conn.reader.readline()  # no answer to half a line
    conn.close()
    conn = Connection(daemon)
    conn.send(b'{"command": "pi')
    wait_for(lambda: status(daemon))  # the daemon has read the half line by now
    conn.send(b'ng"}\n')
    assert conn.reply() == {"ok": True, "result": "pong"}
    conn.close()
    # Half a UTF-8 sequence, then a newline.
    conn = Connection(daemon)
    conn.send('{"command": "p\u00e9"}'.encode()[:-3] + b"\n")
    assert "UTF-8" in assert_error(conn.reply())
    conn.close()


def test_oversized_lines_get_an_error_and_are_cut_off(daemon: Daemon) -> None:
    # 70 KB and no newline: an error, then the daemon closes the connection.
    conn = Connection(daemon)
    conn.send(b"a" * 70_000)
    assert "longer than" in assert_error(conn.reply())
    assert conn.reply() is None
    conn.close()
    # 1 MB with a newline at the end, sent as fast as possible.
    # Never answered as a ping: at most the error, then the daemon ends the connection (EOF,
    # or a reset while the client still sends; a connection left open times the read out).
    conn = Connection(daemon)
    replies = []
    try:
        conn.send(b'{"command": "ping", "pad": "' + b"x" * 1_000_000 + b'"}\n')
        while (reply := conn.reply()) is not None:
            replies.append(reply)
    except (BrokenPipeError, ConnectionResetError):
        pass
    conn.close()
    assert len(replies) <= 1 and all("longer than" in assert_error(r) for r in replies), replies


# -- many clients, and one that never reads --------------------------------------------------


def test_a_hundred_concurrent_clients_are_all_answered(daemon: Daemon) -> None:
    clients = 100
    barrier = threading.Barrier(clients)
    replies: dict[int, list[Any]] = {}

    def client(i: int) -> None:
        try:
            conn = Connection(daemon)
            try:
                barrier.wait(10)
                replies[i] = [conn.ask({"command": "status"}), conn.ask({"command": "ping"})]
            finally:
                conn.close()
        except (OSError, threading.BrokenBarrierError) as exc:
            replies[i] = [repr(exc)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == clients
    for i, (status_reply, ping_reply) in replies.items():
        assert status_reply["ok"] and status_reply["result"]["daemon"]["pid"] == daemon.pid, i
        assert ping_reply == {"ok": True, "result": "pong"}, i


def test_a_client_that_never_reads_is_cut_off_and_slows_nobody(daemon: Daemon) -> None:
    batch = b'{"command": "metrics"}\n' * 20
    greedy = Connection(daemon)
    greedy.sock.setblocking(False)
    slowest_ping = 0.0
    cut_off = False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            try:
                greedy.sock.send(batch)
            except BlockingIOError:
                pass  # the daemon reads no more from us until we read: flow control
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
            started = time.monotonic()
            probe = Connection(daemon)
            assert probe.ask({"command": "ping"}) == {"ok": True, "result": "pong"}
            probe.close()
            slowest_ping = max(slowest_ping, time.monotonic() - started)
            if daemon.find("client_not_reading"):
                cut_off = True
                break
    finally:
        greedy.close()
    print(f"slowest ping while a client did not read: {slowest_ping * 1000:.1f} ms")
    assert cut_off, "a client that never reads is never cut off"
    daemon.wait_event("client_not_reading")
    assert slowest_ping < 0.5
