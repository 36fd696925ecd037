"""The benchmark's uvloop peer: asyncio's streams echo on uvloop's event loop.

It is the peer for the issue's stretch goal (fork-pool connections/s at or above uvloop's). The
test extra installs uvloop, so here it is served for real, and the run without it is a real
benchmark run in an interpreter that cannot import it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.test_bench_cpus import alive

sys.path.insert(0, str(REPO / "scripts"))

from bench.ports import PortAllocator
from bench.targets import PeerTarget


def test_the_uvloop_peer_echoes_every_client_on_uvloops_own_loop() -> None:
    pytest.importorskip("uvloop")
    target = PeerTarget("uvloop", "uvloop", PortAllocator("127.0.0.1"))
    assert target.unavailable() is None
    running = target.start()
    try:
        server = psutil.Process(running.pid)
        clients = [
            socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(3)
        ]
        for i, client in enumerate(clients):
            client.sendall(b"x" * 63 + b"%d" % i)
        for i, client in enumerate(clients):
            assert recv_exactly(client, 64) == b"x" * 63 + b"%d" % i
            client.close()
        # The loop that serves is libuv's: uvloop's extension module is mapped in the server.
        assert any("uvloop" in m.path and "loop" in m.path for m in server.memory_maps())
    finally:
        target.stop()
    assert not alive(server), "the peer outlived stop()"


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_without_uvloop_the_benchmark_skips_that_peer_with_a_note(tmp_path: Path) -> None:
    # sys.modules[name] = None is how Python marks a module as not importable: find_spec()
    # returns None and `import uvloop` raises ImportError, in the benchmark and its children.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]),
    }
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--quick",
            "--only",
            "uvloop",
            "--results",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads((results / "results.json").read_text())
    # Only the skip: a note that the machine was busy before the run may come with it.
    notes = [n for n in data["notes"] if not n.startswith("the machine is busy before the run")]
    assert notes == ["uvloop: skipped: uvloop is not installed (pip install -e '.[bench]')"], notes
    assert data["runs"] == []
