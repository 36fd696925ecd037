"""The benchmark's --pin: the load generator on CPUs of its own, every server on the rest.

Real processes: a child's affinity is read back from the kernel, and a ForkingTCPServer peer is
started pinned and made to fork a handler, which must be confined with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench.cpus import children_on, split_cpus  # noqa: E402
from bench.ports import PortAllocator  # noqa: E402
from bench.targets import PeerTarget  # noqa: E402

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="pinning apart needs two CPUs"
)


@pytest.fixture
def one_server_cpu() -> Iterator[frozenset[int]]:
    """A CPU the servers get: the highest we may run on (what split_cpus gives them at 2 CPUs)."""
    yield frozenset({max(os.sched_getaffinity(0))})


def test_split_gives_the_generator_the_lowest_cpus_and_the_servers_the_rest() -> None:
    split = split_cpus(1, {0, 1})
    assert (split.generator, split.servers) == ({0}, {1})
    split = split_cpus(2, {3, 1, 7, 5})
    assert (split.generator, split.servers) == ({1, 3}, {5, 7})
    assert split.as_record() == {"generator": [1, 3], "servers": [5, 7]}
    assert split.describe() == "the load generator on CPU 1,3, every server on CPU 5,7"


@pytest.mark.parametrize(("threads", "cpus"), [(1, {0}), (2, {0, 1})])
def test_split_refuses_to_leave_the_servers_no_cpu(threads: int, cpus: set[int]) -> None:
    with pytest.raises(ValueError, match="leave the servers none"):
        split_cpus(threads, cpus)


@needs_two_cpus
def test_a_child_started_in_the_block_runs_on_its_cpus_and_we_do_not(
    one_server_cpu: frozenset[int],
) -> None:
    ours = os.sched_getaffinity(0)
    with children_on(one_server_cpu):
        assert child_cpus() == one_server_cpu
    assert os.sched_getaffinity(0) == ours


def test_without_cpus_a_child_runs_wherever_we_may() -> None:
    with children_on(None):
        assert child_cpus() == os.sched_getaffinity(0)


def child_cpus() -> set[int]:
    """The CPUs a child process started now may run on, as it reads them itself."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(*os.sched_getaffinity(0))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {int(cpu) for cpu in out.split()}


@needs_two_cpus
def test_a_pinned_server_and_the_handler_it_forks_stay_on_the_servers_cpus(
    one_server_cpu: frozenset[int],
) -> None:
    target = PeerTarget("ForkingTCPServer", "forking", PortAllocator("127.0.0.1"))
    target.cpus = one_server_cpu
    running = target.start()
    try:
        server = psutil.Process(running.pid)
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as client:
            client.sendall(b"ping\n")
            assert client.recv(64) == b"ping\n"  # a forked child is serving it now
            procs = [server, *server.children(recursive=True)]
            assert len(procs) > 1
            for proc in procs:
                assert set(proc.cpu_affinity()) == one_server_cpu, proc
    finally:
        target.stop()
    assert not [p for p in procs if alive(p)], "the peer left processes behind"


def alive(proc: psutil.Process, within: float = 5.0) -> bool:
    """Whether proc is still running (not a zombie) after waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.02)
    return True


def test_pin_with_one_cpu_is_refused_before_anything_runs(tmp_path: Path) -> None:
    one = min(os.sched_getaffinity(0))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--pin", "--results", str(tmp_path)],
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--pin needs more CPUs than generator threads" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())
