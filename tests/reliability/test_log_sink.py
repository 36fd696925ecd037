"""A log sink that goes away costs the log lines, never the daemon.

The daemon's stdout and stderr are a pipe, as when it runs under a log shipper or `| tee`. Once it
serves, the reader closes its end: every log line from then on meets EPIPE. The daemon must go on
serving, log what it logs (a handler's failure, a reload, a fork worker's death and replacement)
without tripping over it, and stop cleanly with status 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import tomli_w

from tests.conftest import (
    REPO,
    daemon_section,
    echo_roundtrip,
    free_port,
    running_with,
    wait_for,
)

FAILING = """
import socketserver


class Fail(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        raise ValueError("boom")
"""


def test_a_closed_log_pipe_costs_the_daemon_nothing(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING)
    echo, fork, fail = free_port(), free_port(), free_port()
    servers = {
        "echo": {"listen": f"127.0.0.1:{echo}", "handler": "echo"},
        "fork": {
            "listen": f"127.0.0.1:{fork}",
            "handler": "echo",
            "concurrency": "fork",
            "workers": 1,
        },
        "fail": {"listen": f"127.0.0.1:{fail}", "handler": "failing:Fail"},
    }
    config = tmp_path / "selectd.toml"
    config.write_text(daemon_section(tmp_path) + tomli_w.dumps({"servers": servers}))
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        stderr=write_end,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)])),
        cwd=tmp_path,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as logs:
            for line in logs:
                if b'"daemon_ready"' in line:
                    break
            else:
                raise AssertionError(f"selectd exited {proc.wait()} before it was ready")
        # The reader is gone: every log line from here on meets EPIPE.

        for _ in range(3):
            assert echo_roundtrip(echo) == b"hello\n"
            assert echo_roundtrip(fork) == b"hello\n"
            assert echo_roundtrip(fail) == b""  # request_failed is logged, to nowhere
        (worker,) = psutil.Process(proc.pid).children()
        worker.kill()  # worker_exited, worker_spawned: logged by the loop
        wait_for(lambda: replacement(proc.pid, worker.pid))
        assert echo_roundtrip(fork) == b"hello\n"
        proc.send_signal(signal.SIGHUP)  # a reload, logged
        assert echo_roundtrip(echo) == b"hello\n"
        assert proc.poll() is None, "selectd died with its log sink"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: not running_with(str(config)), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def replacement(pid: int, dead: int) -> bool:
    """Whether the daemon `pid` has a fork worker again, other than `dead`."""
    return any(child.pid != dead for child in psutil.Process(pid).children())
