"""Build and drive the C load generator (loadgen.c).

Usage:

    binary = build_loadgen()                       # cc -O2, cached in scripts/bench/build/
    spec = LoadSpec(mode="rtt", clients=32, duration=5.0)
    result = run_loadgen(binary, "127.0.0.1", port, spec, on_window=sampler)

on_window(event) is called with "start" when the measured window opens (after the warm-up) and
with "end" when it has closed, so the caller can sample the server's CPU over exactly that window.
The result is the generator's JSON line as a dict (see loadgen.c for the fields).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpus import children_on

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "loadgen.c"
BUILD_DIR = HERE / "build"

# Time allowed beyond warm-up + duration for the generator to start, finish and print.
_EXIT_SLACK = 30.0


class LoadgenError(Exception):
    """The generator could not be built, or a run did not produce a result."""


def find_compiler() -> str | None:
    """The C compiler to use ($CC, else cc), or None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def build_loadgen(build_dir: Path = BUILD_DIR) -> Path:
    """Compile loadgen.c unless the binary is newer than the source; return its path."""
    binary = build_dir / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = find_compiler()
    if cc is None:
        raise LoadgenError("no C compiler: set CC or install cc")
    build_dir.mkdir(parents=True, exist_ok=True)
    # Build under a private name and rename, so a concurrent run never executes half a file.
    tmp = build_dir / f".loadgen.{os.getpid()}"
    cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LoadgenError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    tmp.replace(binary)
    return binary


# Conn mode spreads connections over this many source addresses, 127.0.0.1..16, by default. With
# one, the generator's own connect() is what limits a fast server: it searches ~28k ephemeral
# ports, most in TIME_WAIT, for a reusable one (a quarter of its samples under perf at 14k
# connections/s, where asyncio and selectd then both stopped); sixteen give ~450k 4-tuples.
DEFAULT_SOURCE_ADDRS = 16


@dataclass(frozen=True)
class LoadSpec:
    """One generator run: mode "conn" or "rtt", clients, seconds measured after warm-up."""

    mode: str
    clients: int
    duration: float
    warmup: float = 0.5
    line_bytes: int = 64
    threads: int = 1
    op_timeout: float = 5.0
    source_addrs: int = 1
    cpus: frozenset[int] | None = None  # run on these CPUs only (--pin); None: anywhere

    def argv(self, binary: Path, host: str, port: int) -> list[str]:
        return [
            str(binary),
            host,
            str(port),
            *("-m", self.mode, "-c", str(self.clients), "-l", str(self.line_bytes)),
            *("-d", str(self.duration), "-w", str(self.warmup), "-t", str(self.threads)),
            *("-T", str(self.op_timeout), "-s", str(self.source_addrs)),
        ]


def run_loadgen(
    binary: Path,
    host: str,
    port: int,
    spec: LoadSpec,
    on_window: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one load, bounded in time; return the generator's JSON result."""
    deadline = time.monotonic() + spec.warmup + spec.duration + _EXIT_SLACK
    with children_on(spec.cpus):
        proc = subprocess.Popen(
            spec.argv(binary, host, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    result: dict[str, Any] | None = None
    try:
        for line in _lines(proc, deadline):
            if line.startswith("# measuring"):
                if on_window:
                    on_window("start")
            elif line.startswith("{"):
                if on_window:
                    on_window("end")
                result = json.loads(line)
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise LoadgenError(f"loadgen still running {_EXIT_SLACK:.0f} s after its end") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    if proc.returncode != 0 or result is None:
        raise LoadgenError(f"loadgen exited with {proc.returncode}: {stderr.strip()}")
    return result


def _lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """Yield stdout lines as they arrive; raise TimeoutExpired past deadline."""
    assert proc.stdout is not None
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                if buf:
                    yield buf.decode()
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode()
