"""`python3 -m servers SERVICE ADDRESS [--udp]` as a real process, stopped by real signals."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from servers_testing import REPO, free_port, requires_ipv6, run_python, subprocess_env, wait_for

from servers.__main__ import parse_address


class Service:
    """A `python -m servers` process; its output goes to a file so that it can never block."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servers", *args],
            cwd=REPO,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(*args: str) -> Service:
        started.append(Service(list(args), tmp_path / f"service{len(started)}.log"))
        return started[-1]

    yield start
    for svc in started:
        svc.close()


def stream_echo(address: Any, family: int = socket.AF_INET) -> bytes | None:
    """One echo round trip; None while nothing listens yet."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(address)
            client.sendall(b"hello\r\n")
            client.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := client.recv(4096):
                data += chunk
            return data
    except (ConnectionRefusedError, FileNotFoundError):
        return None


def udp_echo(address: Any) -> bytes | None:
    """One datagram round trip; None when no answer comes (not up yet, or lost)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.1)
        client.sendto(b"hello", address)
        try:
            return client.recv(4096)
        except (TimeoutError, ConnectionRefusedError):
            return None


def until_up(svc: Service, probe: Callable[[], bytes | None]) -> bytes:
    def answered() -> bytes | None:
        assert svc.alive(), f"exited {svc.proc.returncode}:\n{svc.output()}"
        return probe()

    return wait_for(answered, timeout=15, interval=0.02, message=svc.output)


def test_echo_over_tcp_and_sigterm_exits_zero(service: Callable[..., Service]) -> None:
    port = free_port()
    svc = service("echo", f"127.0.0.1:{port}")
    assert until_up(svc, lambda: stream_echo(("127.0.0.1", port))) == b"hello\r\n"
    assert stream_echo(("127.0.0.1", port)) == b"hello\r\n"
    assert svc.stop(signal.SIGTERM, timeout=5) == 0
    assert "Traceback" not in svc.output()
    assert stream_echo(("127.0.0.1", port)) is None  # the listener is gone


def test_sigint_stops_it_cleanly_too(service: Callable[..., Service]) -> None:
    port = free_port()
    svc = service("echo", f"127.0.0.1:{port}")
    until_up(svc, lambda: stream_echo(("127.0.0.1", port)))
    assert svc.stop(signal.SIGINT, timeout=5) == 0
    assert "Traceback" not in svc.output()


def test_sigterm_while_a_client_is_connected(service: Callable[..., Service]) -> None:
    port = free_port()
    svc = service("echo", f"127.0.0.1:{port}")
    until_up(svc, lambda: stream_echo(("127.0.0.1", port)))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle_client:
        idle_client.sendall(b"x")
        assert idle_client.recv(1) == b"x"  # its handler thread is running
        assert svc.stop(signal.SIGTERM, timeout=5) == 0


def tgkill(pid: int, tid: int, signum: int) -> None:
    """Send a signal to one thread of another process (os.kill lets the kernel pick the thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, signum) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def test_signal_handled_by_another_thread_still_stops_it(service: Callable[..., Service]) -> None:
    # A process-directed signal may run its C-level handler on any thread, and a signal can land
    # just before the main thread enters select(): either way select() is not interrupted, and
    # the Python handler waits for bytecode that never runs. Aim the signal at a handler thread
    # to make that case deterministic.
    port = free_port()
    svc = service("echo", f"127.0.0.1:{port}")
    until_up(svc, lambda: stream_echo(("127.0.0.1", port)))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"  # its handler thread is up, blocked in recv()
        pid = svc.proc.pid
        others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        assert others
        tgkill(pid, others[0], signal.SIGTERM)
        assert svc.proc.wait(5) == 0


def test_udp_mode(service: Callable[..., Service]) -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    svc = service("echo", f"127.0.0.1:{port}", "--udp")
    assert until_up(svc, lambda: udp_echo(("127.0.0.1", port))) == b"hello"
    assert svc.stop(timeout=5) == 0


@requires_ipv6
def test_ipv6_address_in_brackets(service: Callable[..., Service]) -> None:
    port = free_port(socket.AF_INET6)
    svc = service("echo", f"[::1]:{port}")
    probe = lambda: stream_echo(("::1", port), socket.AF_INET6)  # noqa: E731
    assert until_up(svc, probe) == b"hello\r\n"
    assert svc.stop(timeout=5) == 0


def test_unix_socket_address_and_its_file_is_removed(
    service: Callable[..., Service], sockdir: Path
) -> None:
    path = sockdir / "echo.sock"
    svc = service("echo", f"unix:{path}")
    assert until_up(svc, lambda: stream_echo(str(path), socket.AF_UNIX)) == b"hello\r\n"
    assert svc.stop(timeout=5) == 0
    assert not path.exists()


@pytest.mark.parametrize(
    "address",
    [
        "nonsense",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:port",
        "127.0.0.1:99999",
        "127.0.0.1:-1",
        "[::1]:abc",
        "[::1:7",
        "unix:",
    ],
)
def test_bad_address_is_a_usage_error(address: str) -> None:
    proc = run_python(["-m", "servers", "echo", address], timeout=10)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_parse_address_ipv4(host: Any, port: int) -> None:
    assert parse_address(f"{host}:{port}") == (str(host), port)


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_parse_address_ipv6_in_brackets(host: Any, port: int) -> None:
    assert parse_address(f"[{host}]:{port}") == (str(host), port)


@given(st.integers(65536, 10**30))
def test_parse_address_rejects_ports_beyond_65535(port: int) -> None:
    with pytest.raises(ValueError):
        parse_address(f"127.0.0.1:{port}")


def test_unknown_service_is_a_usage_error() -> None:
    proc = run_python(["-m", "servers", "qotd", "127.0.0.1:0"], timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage:")
    assert "Traceback" not in proc.stderr


def test_address_in_use_exits_one_with_a_message() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_python(["-m", "servers", "echo", f"127.0.0.1:{port}"], timeout=30)
    assert proc.returncode == 1
    assert "cannot serve echo" in proc.stderr
    assert "Traceback" not in proc.stderr
