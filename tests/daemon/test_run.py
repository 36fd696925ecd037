"""The supervisor as a real process: listen forms, concurrency modes, pools, errors, drain."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for

HANDLERS = '''
import os
import socketserver
import time


class PidHandler(socketserver.StreamRequestHandler):
    """Answers each line with the pid of the process that ran the handler."""

    def handle(self):
        while self.rfile.readline():
            self.wfile.write(f"{os.getpid()}\\n".encode())


class SlowEcho(socketserver.StreamRequestHandler):
    """Echoes one line after options.delay seconds."""

    def handle(self):
        line = self.rfile.readline()
        time.sleep(float(self.server.options.get("delay", 1.0)))
        self.wfile.write(line)


class Fail(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        if line.startswith(b"exit"):
            raise SystemExit(3)
        raise ValueError("boom: " + line.decode().strip())


class Die(socketserver.BaseRequestHandler):
    """Kills its own process: in a fork worker, a worker that dies before serving anything."""

    def handle(self):
        os._exit(9)


class ReadLine(socketserver.StreamRequestHandler):
    """Echoes lines until EOF; what a stalled client does to it is the test."""

    def handle(self):
        while line := self.rfile.readline():
            self.wfile.write(line)
'''


@pytest.fixture
def handlers(tmp_path: Path) -> str:
    (tmp_path / "testhandlers.py").write_text(HANDLERS)
    return "testhandlers"


def server_section(name: str, **keys: object) -> str:
    return tomli_w.dumps({"servers": {name: keys}})


def slow_server(
    tmp_path: Path, handlers: str, port: int, delay: float, shutdown_timeout: float = 10, **keys
) -> str:
    """A config with one server, "slow", whose handler echoes a line after `delay` seconds."""
    return daemon_section(tmp_path, shutdown_timeout=shutdown_timeout) + server_section(
        "slow",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:SlowEcho",
        options={"delay": delay},
        **keys,
    )


def server_status(daemon, name: str) -> dict:
    return daemon.control("status", server=name)["result"]["servers"][name]


def wait_until_taken(daemon, name: str, count: int) -> None:
    """Until the daemon has taken `count` connections for `name` (dispatched or rejected)."""
    wait_for(lambda: (s := server_status(daemon, name))["requests"] + s["rejected"] >= count)


def wait_until_active(daemon, name: str, count: int = 1) -> None:
    """Until `count` requests of `name` are in a handler."""
    wait_for(lambda: server_status(daemon, name)["active"] >= count)


def ask(port: int, line: bytes, host: str = "127.0.0.1", timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(line)
        f = s.makefile("rb")
        return f.readline()


# -- listen forms ----------------------------------------------------------------------------


def test_every_listen_form_serves_echo(start_daemon, tmp_path: Path) -> None:
    tcp4 = free_port()
    udp4 = free_port(socket.SOCK_DGRAM)
    unix_stream = f"{tmp_path}/echo.sock"
    unix_dgram = f"{tmp_path}/echo-dgram.sock"
    config = daemon_section(tmp_path)
    config += server_section("tcp4", listen=f"127.0.0.1:{tcp4}", handler="echo")
    config += server_section(
        "udp4", listen=f"127.0.0.1:{udp4}", handler="echo", socket_type="dgram"
    )
    config += server_section("ustream", listen=f"unix:{unix_stream}", handler="echo")
    config += server_section(
        "udgram", listen=f"unix:{unix_dgram}", handler="echo", socket_type="dgram"
    )
    has_v6 = socket.has_ipv6
    if has_v6:
        try:
            tcp6 = free_port(host="::1")
        except OSError:
            has_v6 = False
    if has_v6:
        config += server_section("tcp6", listen=f"[::1]:{tcp6}", handler="echo")
    daemon = start_daemon(config)

    assert echo_roundtrip(tcp4, b"four\n") == b"four\n"
    if has_v6:
        assert echo_roundtrip(tcp6, b"six\n", host="::1") == b"six\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"datagram", ("127.0.0.1", udp4))
        assert s.recvfrom(100)[0] == b"datagram"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(unix_stream)
        s.sendall(b"unix\n")
        assert s.recv(100) == b"unix\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(f"{tmp_path}/client.sock")
        s.sendto(b"unix datagram", unix_dgram)
        assert s.recv(100) == b"unix datagram"

    started = {e["server"]: e for e in daemon.find("server_started")}
    assert started["tcp4"]["address"] == f"127.0.0.1:{tcp4}"
    assert started["ustream"]["address"] == unix_stream
    assert daemon.stop() == 0
    assert not os.path.exists(unix_stream), "the daemon removes the socket files it created"
    assert not os.path.exists(unix_dgram)
    daemon.wait_event("shutdown_complete")


def test_stale_unix_socket_file_is_replaced(start_daemon, tmp_path: Path) -> None:
    path = f"{tmp_path}/stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays behind, with nobody listening
    config = daemon_section(tmp_path) + server_section("u", listen=f"unix:{path}", handler="echo")
    start_daemon(config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"x")
        assert s.recv(10) == b"x"


# -- concurrency modes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inline", "thread", "fork"])
def test_each_concurrency_mode_serves(start_daemon, tmp_path: Path, mode: str) -> None:
    port = free_port()
    keys: dict[str, object] = {
        "listen": f"127.0.0.1:{port}",
        "handler": "echo",
        "concurrency": mode,
    }
    if mode != "inline":
        keys["workers"] = 2
    daemon = start_daemon(daemon_section(tmp_path) + server_section("echo", **keys))
    for i in range(20):
        payload = f"request {i}\n".encode() * (i + 1)
        assert echo_roundtrip(port, payload) == payload
    assert daemon.stop() == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell apart")
def test_thread_cpu_puts_thread_pools_on_one_cpu_and_nothing_else(
    start_daemon, tmp_path: Path
) -> None:
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    thread_port, fork_port = free_port(), free_port()
    config = daemon_section(tmp_path, thread_cpu=cpu)
    config += server_section(
        "threads", listen=f"127.0.0.1:{thread_port}", handler="echo", workers=4
    )
    config += server_section(
        "forks", listen=f"127.0.0.1:{fork_port}", handler="echo", concurrency="fork", workers=2
    )
    daemon = start_daemon(config)
    for _ in range(8):
        assert echo_roundtrip(thread_port) == b"hello\n"
        assert echo_roundtrip(fork_port) == b"hello\n"
    threads = {t.id for t in psutil.Process(daemon.pid).threads()} - {daemon.pid}
    # The log's writer thread, there once a pipe, socket or terminal on stderr refused a line.
    log_threads = {tid for tid in threads if thread_name(daemon.pid, tid) == "selectd-log"}
    pool_threads = threads - log_threads
    assert pool_threads, "the thread pool started no thread"
    for tid in pool_threads:
        assert os.sched_getaffinity(tid) == {cpu}, f"pool thread {tid}"
    # The loop itself, the log's writer, and the fork workers (processes of their own, no GIL
    # to share), keep every CPU.
    for tid in {daemon.pid, *log_threads}:
        assert os.sched_getaffinity(tid) == allowed, f"thread {tid}"
    workers = daemon.children()
    assert len(workers) == 2
    for worker in workers:
        assert os.sched_getaffinity(worker.pid) == allowed, f"fork worker {worker.pid}"
    assert daemon.stop() == 0


def pid_pool_config(tmp_path: Path, port: int, handlers: str) -> str:
    """A daemon whose one server, "pids", is a pool of two fork workers answering their pid."""
    return daemon_section(tmp_path) + server_section(
        "pids",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:PidHandler",
        concurrency="fork",
        workers=2,
    )


def test_fork_pool_is_preforked_and_reused(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    daemon = start_daemon(pid_pool_config(tmp_path, port, handlers))
    spawned = {e["worker_pid"] for e in daemon.find("worker_spawned", server="pids")}
    assert len(spawned) == 2
    assert {c.pid for c in daemon.children()} == spawned
    seen = [int(ask(port, b"pid?\n")) for _ in range(30)]
    assert set(seen) <= spawned, "every request ran in a pre-forked worker"
    assert daemon.pid not in seen
    assert len(seen) > len(set(seen)), "workers are reused across requests"
    assert daemon.stop() == 0
    exited = daemon.find("worker_exited", server="pids")
    assert {e["worker_pid"] for e in exited} == spawned
    assert all(e.get("exit_code") == 0 for e in exited)


def test_fork_worker_killed_is_replaced(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    daemon = start_daemon(pid_pool_config(tmp_path, port, handlers))
    victim = int(ask(port, b"pid?\n"))
    os.kill(victim, signal.SIGKILL)
    event = daemon.wait_event("worker_exited", worker_pid=victim)
    assert event["signal"] == "SIGKILL"
    wait_for(lambda: len(daemon.find("worker_spawned", server="pids")) == 3)
    pids = {int(ask(port, b"pid?\n")) for _ in range(20)}
    assert victim not in pids
    assert daemon.stop() == 0


def test_workers_that_keep_dying_mark_the_server_failed(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    echo_port = free_port()
    config = daemon_section(tmp_path)
    config += server_section(
        "doomed",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:Die",
        concurrency="fork",
        workers=1,
    )
    config += server_section("echo", listen=f"127.0.0.1:{echo_port}", handler="echo")
    daemon = start_daemon(config)

    def poke() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"x")
                s.recv(10)
        except ConnectionRefusedError:
            return True  # the listener is gone: the server gave up
        except OSError:
            pass
        return bool(daemon.find("server_failed", server="doomed"))

    wait_for(poke, 30, interval=0.05)
    failed = daemon.wait_event("server_failed", server="doomed")
    assert "died at boot" in failed["reason"]
    exits = daemon.find("worker_exited", server="doomed")
    assert len(exits) >= 5 and all(e["exit_code"] == 9 for e in exits)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert echo_roundtrip(echo_port) == b"hello\n", "the other servers carry on"
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["inline", "thread", "fork"])
def test_no_descriptor_leaks_across_many_requests(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    fail_port = free_port()
    config = daemon_section(tmp_path, log_level="warning")
    config += server_section(
        "echo", listen=f"127.0.0.1:{port}", handler="echo", concurrency=mode, timeout=5
    )
    config += server_section(
        "fail", listen=f"127.0.0.1:{fail_port}", handler=f"{handlers}:Fail", concurrency=mode
    )
    daemon = start_daemon(config)
    proc = psutil.Process(daemon.pid)
    assert echo_roundtrip(port) == b"hello\n"
    baseline = proc.num_fds()
    for _ in range(100):
        assert echo_roundtrip(port) == b"hello\n"
        assert ask(fail_port, b"boom\n") == b""
    wait_for(lambda: proc.num_fds() <= baseline, 5)
    workers = daemon.children()
    if mode == "fork":
        wait_for(lambda: all(w.num_fds() <= 8 for w in workers), 5)
    assert daemon.stop() == 0


# -- pool bounds -----------------------------------------------------------------------------


def clients_in_order(daemon, port: int, n: int) -> tuple[list[threading.Thread], dict[int, bytes]]:
    """n clients of the "slow" server, each sending its number, started one after the other once
    the daemon has taken the previous one; results[i] is what client i got (or its error)."""
    results: dict[int, bytes] = {}

    def client(i: int) -> None:
        try:
            results[i] = ask(port, f"{i}\n".encode())
        except OSError as exc:
            results[i] = repr(exc).encode()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for i, t in enumerate(threads):
        t.start()
        wait_until_taken(daemon, "slow", i + 1)  # the connections arrive in order
    return threads, results


def test_thread_pool_never_exceeds_workers_and_rejects_beyond_queue(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    config = slow_server(
        tmp_path, handlers, port, 1.5, concurrency="thread", workers=3, max_queue=2
    )
    daemon = start_daemon(config)
    baseline = psutil.Process(daemon.pid).num_threads()
    threads, results = clients_in_order(daemon, port, 8)
    wait_for(lambda: daemon.find("request_rejected"), 5)
    peak = psutil.Process(daemon.pid).num_threads()
    for t in threads:
        t.join(15)
    assert peak - baseline <= 3, f"threads grew from {baseline} to {peak} with workers = 3"
    served = [i for i, r in results.items() if r == f"{i}\n".encode()]
    refused = [i for i, r in results.items() if r in (b"",) or r.startswith(b"Connection")]
    assert len(served) == 5, results  # 3 running + 2 queued
    assert len(refused) == 3, results
    assert daemon.stop() == 0


def test_fork_pool_rejects_beyond_queue(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    config = slow_server(tmp_path, handlers, port, 1.0, concurrency="fork", workers=2, max_queue=1)
    daemon = start_daemon(config)
    threads, results = clients_in_order(daemon, port, 5)
    for t in threads:
        t.join(15)
    served = [i for i, r in results.items() if r == f"{i}\n".encode()]
    assert len(served) == 3, results
    assert len(daemon.find("request_rejected", server="slow")) >= 1
    assert daemon.stop() == 0


# -- handlers --------------------------------------------------------------------------------


def test_stdlib_handler_module_from_a_temporary_directory(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server_section(
        "lines", listen=f"127.0.0.1:{port}", handler=f"{handlers}:ReadLine"
    )
    start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rwb")
        for i in range(5):
            f.write(f"line {i}\n".encode())
            f.flush()
            assert f.readline() == f"line {i}\n".encode()


@pytest.mark.parametrize("mode", ["inline", "thread", "fork"])
def test_handler_errors_are_logged_and_serving_continues(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    echo_port = free_port()
    config = daemon_section(tmp_path)
    config += server_section(
        "fail", listen=f"127.0.0.1:{port}", handler=f"{handlers}:Fail", concurrency=mode
    )
    config += server_section("echo", listen=f"127.0.0.1:{echo_port}", handler="echo")
    daemon = start_daemon(config)
    assert ask(port, b"first\n") == b""
    assert ask(port, b"exit\n") == b""  # SystemExit in a handler costs only its request
    assert ask(port, b"second\n") == b""
    failed = wait_for(
        lambda: (
            len(daemon.find("request_failed", server="fail")) == 3
            and daemon.find("request_failed", server="fail")
        )
    )
    first = failed[0]
    assert first["level"] == "error"
    assert first["exc_type"] == "ValueError"
    assert first["exc_message"] == "boom: first"
    assert first["client"].startswith("127.0.0.1:")
    assert isinstance(first["exception"], list), "a structured (dict) traceback"
    assert first["exception"][0]["exc_type"] == "ValueError"
    assert failed[1]["exc_type"] == "SystemExit"
    assert echo_roundtrip(echo_port) == b"hello\n"
    assert daemon.stop() == 0


# -- access and timeouts ---------------------------------------------------------------------


def test_denied_clients_are_closed_counted_and_logged(start_daemon, tmp_path: Path) -> None:
    denied_port = free_port()
    allowed_port = free_port()
    config = daemon_section(tmp_path)
    config += server_section(
        "denied", listen=f"127.0.0.1:{denied_port}", handler="echo", deny=["127.0.0.0/8"]
    )
    config += server_section(
        "allowed",
        listen=f"127.0.0.1:{allowed_port}",
        handler="echo",
        allow=["127.0.0.1/32"],
        deny=["10.0.0.0/8"],
    )
    daemon = start_daemon(config)
    assert echo_roundtrip(denied_port, b"let me in\n") == b""
    event = daemon.wait_event("request_denied", server="denied")
    assert event["client"].startswith("127.0.0.1:")
    assert echo_roundtrip(allowed_port, b"welcome\n") == b"welcome\n"
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["inline", "thread", "fork"])
def test_stalled_client_is_cut_off_by_timeout(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    config = daemon_section(tmp_path) + server_section(
        "lines",
        listen=f"127.0.0.1:{port}",
        handler=f"{handlers}:ReadLine",
        concurrency=mode,
        timeout=0.5,
    )
    start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"half a li")  # and then nothing
        started = time.monotonic()
        # The handler's readline() times out (it never sees the half line as a whole one)
        # and the connection is closed.
        assert s.recv(100) == b""
        elapsed = time.monotonic() - started
    assert 0.3 < elapsed < 5, elapsed
    assert echo_roundtrip(port, b"still serving\n") == b"still serving\n"


# -- graceful stop ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_graceful_drain_finishes_the_request_in_flight(
    start_daemon, tmp_path: Path, handlers: str, mode: str
) -> None:
    port = free_port()
    config = slow_server(
        tmp_path, handlers, port, 1.0, shutdown_timeout=10, concurrency=mode, workers=2
    )
    daemon = start_daemon(config)
    answer: list[bytes] = []
    client = threading.Thread(target=lambda: answer.append(ask(port, b"in flight\n")))
    client.start()
    wait_until_active(daemon, "slow")  # the request is in the handler's sleep now
    daemon.send(signal.SIGTERM)
    daemon.wait_event("shutdown_begun")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    client.join(10)
    assert answer == [b"in flight\n"]
    assert daemon.proc.wait(10) == 0
    done = daemon.wait_event("shutdown_complete")
    assert done["drained"] == 1
    assert done["forced"] == 0


def test_shutdown_timeout_forces_and_exits_nonzero(
    start_daemon, tmp_path: Path, handlers: str
) -> None:
    port = free_port()
    config = slow_server(
        tmp_path, handlers, port, 30, shutdown_timeout=0.5, concurrency="fork", workers=1
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"never answered\n")
        wait_until_active(daemon, "slow")
        daemon.send(signal.SIGTERM)
        assert s.recv(100) == b""
    assert daemon.proc.wait(10) == 1
    done = daemon.wait_event("shutdown_complete")
    assert done["forced"] == 1


def test_second_sigint_forces(start_daemon, tmp_path: Path, handlers: str) -> None:
    port = free_port()
    config = slow_server(
        tmp_path, handlers, port, 30, shutdown_timeout=60, concurrency="thread", workers=1
    )
    daemon = start_daemon(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x\n")
        wait_until_active(daemon, "slow")
        daemon.send(signal.SIGINT)
        daemon.wait_event("shutdown_begun")
        daemon.send(signal.SIGINT)
        daemon.wait_event("shutdown_forcing")
    assert daemon.proc.wait(15) == 1


def thread_name(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
