"""selectd itself as a target: a TOML config and `python3 -m daemon run -c FILE`.

Usage:

    target = SelectdTarget("selectd-thread", ports, concurrency="thread", workers=32)
    many = SelectdTarget("selectd", ports, concurrency="thread", workers=1, nservers=1000)

The daemon is still being written, so a target degrades to a note instead of failing the run:
unavailable() says so when `import daemon.cli` fails, and start() raises TargetUnavailable when the
daemon does not accept on every port within STARTUP_TIMEOUT.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from .ports import PortAllocator
from .targets import REPO_DIR, SCRIPTS_DIR, SELECTD, ProcessTarget, python_env

# Thread pool size for the selectd-thread target: one thread per client at the default 32 clients.
THREAD_WORKERS = 32
# Pre-forked workers for the selectd-fork target. A worker serves one connection at a time, so
# with 32 persistent clients a pool of 32 is what "every client is served" takes (the same
# process-per-connection count ForkingTCPServer runs); the conn/s figure is no worse for it.
FORK_WORKERS = 32
# The fork pool's scheduling policy: a worker woken by its client does not preempt what runs on
# that CPU (README, "Scheduling policy"). The thread pool keeps the default: with thread_cpu its
# threads share one CPU and batch bought it nothing (by hand, 8 pairs each).
FORK_POLICY = "batch"
# Per-server settings shared by every selectd target.
MAX_QUEUE = 1024
REQUEST_QUEUE_SIZE = 1024
TIMEOUT = 30
# The peers' own handler class (bench/peers.py), so that every server runs the same code per
# connection and selectd gets no built-in of its own; the daemon imports it from scripts/.
HANDLER = "bench.peers:EchoHandler"


@functools.cache
def import_problem() -> str | None:
    """Why `import daemon.cli` fails in a fresh interpreter at the repo root, or None."""
    proc = subprocess.run(
        [sys.executable, "-c", "import daemon.cli"],
        cwd=REPO_DIR,
        env=python_env(REPO_DIR),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode == 0:
        return None
    last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return f"`import daemon.cli` fails: {last[0]}"


def selectd_config(
    workdir: Path,
    host: str,
    ports: Sequence[int],
    *,
    concurrency: str,
    workers: int,
    cpus: frozenset[int] | None = None,
    scheduling_policy: str | None = None,
) -> dict[str, object]:
    """The daemon config: one echo server per port, all alike, enforcing TIMEOUT, under
    `scheduling_policy` when given; thread pools on the highest of `cpus` (the servers' CPUs
    under --pin; default: every CPU we may use)."""
    policy = {} if scheduling_policy is None else {"scheduling_policy": scheduling_policy}
    width = len(str(len(ports) - 1))
    servers = {
        ("echo" if len(ports) == 1 else f"echo{i:0{width}d}"): {
            "listen": f"{host}:{port}",
            "handler": HANDLER,
            "concurrency": concurrency,
            "workers": workers,
            "max_queue": MAX_QUEUE,
            "request_queue_size": REQUEST_QUEUE_SIZE,
            "timeout": TIMEOUT,
            **policy,
        }
        for i, port in enumerate(ports)
    }
    return {
        "daemon": {
            "control_socket": str(workdir / "control.sock"),
            "log_level": "warning",
            # Thread pools on one CPU, as README ("Thread pools and CPUs") recommends for a
            # machine this small; no other target has a setting like it.
            "thread_cpu": max(cpus or os.sched_getaffinity(0)),
        },
        "servers": servers,
    }


class SelectdTarget(ProcessTarget):
    """The selectd daemon serving the echo on nservers consecutive ports."""

    kind = SELECTD

    def __init__(
        self,
        name: str,
        ports: PortAllocator,
        *,
        concurrency: str,
        workers: int,
        nservers: int = 1,
        scheduling_policy: str | None = None,
    ) -> None:
        super().__init__(name, ports, nports=nservers)
        self.concurrency = concurrency
        self.workers = workers
        self.scheduling_policy = scheduling_policy

    def unavailable(self) -> str | None:
        return import_problem()

    def command(self, workdir: Path, ports: Sequence[int]) -> list[str]:
        config = workdir / "selectd.toml"
        doc = selectd_config(
            workdir,
            self.host,
            ports,
            concurrency=self.concurrency,
            workers=self.workers,
            cpus=self.cpus,
            scheduling_policy=self.scheduling_policy,
        )
        config.write_text(tomli_w.dumps(doc))
        return [sys.executable, "-m", "daemon", "run", "-c", str(config)]

    def cwd(self) -> Path:
        return REPO_DIR

    def env(self) -> dict[str, str]:
        return python_env(REPO_DIR, SCRIPTS_DIR)
