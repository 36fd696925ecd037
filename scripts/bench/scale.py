"""The idle and scale section: N echo listeners in one selectd against N stdlib servers.

Usage:

    records = run_scale((10, 100, 1000), ports, loadgen_binary, ScalePlan(), note=print)

For each N: selectd with N servers (consecutive ports, the peers' echo handler) against one
process running N ThreadingTCPServers, each in serve_forever in its own thread. Figures per target:

- ready_s: from exec to every one of the N ports accepting;
- rss_mb / pss_mb: memory of the process and its children once idle;
- idle_cpu_pct and wakeups_per_s: CPU and voluntary context switches (all threads) while nobody
  connects. The stdlib's serve_forever polls every 0.5 s, so N servers wake 2N times a second;
- dispatch: rtt with one client on one listener while the N-1 others stay registered.

Then run_dispatch() pairs that last figure, as the throughput section pairs its peers: selectd
with one listener and selectd with the largest N run side by side, and take turns under the same
one-client load for a few rounds, so each round compares two figures taken seconds apart (this
VM's speed drifts too much for single runs minutes apart to tell a 10% difference).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpus import CpuSplit
from .loadgen import LoadgenError, LoadSpec, run_loadgen
from .ports import PortAllocator
from .proctree import ProcessTree
from .selectd import SelectdTarget
from .targets import PeerTarget, ProcessTarget, TargetUnavailable

Record = dict[str, Any]  # as stored in results.json
Note = Callable[[str], None]

# How selectd serves the scale section's listeners: a one-thread pool each, the closest match to
# one stdlib ThreadingTCPServer per port (the daemon may also offer "inline").
SCALE_CONCURRENCY = "thread"
SCALE_WORKERS = 1


@dataclass(frozen=True)
class ScalePlan:
    """Timing of the scale section."""

    settle: float = 0.5  # after ready, before the idle window: let start-up work finish
    idle: float = 3.0
    dispatch_duration: float = 3.0
    warmup: float = 0.5
    dispatch_rounds: int = 5  # run_dispatch(): rounds of N=1 against the largest N

    def dispatch_spec(self, generator_cpus: frozenset[int] | None) -> LoadSpec:
        """The dispatch load: one rtt client, on `generator_cpus` (None: anywhere)."""
        return LoadSpec(
            mode="rtt",
            clients=1,
            duration=self.dispatch_duration,
            warmup=self.warmup,
            cpus=generator_cpus,
        )


def selectd_target(name: str, ports: PortAllocator, n: int) -> SelectdTarget:
    """selectd serving the echo on n listeners, as the scale section runs it."""
    return SelectdTarget(
        name, ports, concurrency=SCALE_CONCURRENCY, workers=SCALE_WORKERS, nservers=n
    )


def scale_targets(
    n: int, ports: PortAllocator, cpus: frozenset[int] | None = None
) -> list[ProcessTarget]:
    """The two contenders for N listeners, to run on `cpus` (None: anywhere)."""
    targets: list[ProcessTarget] = [
        selectd_target("selectd", ports, n),
        PeerTarget("ThreadingTCPServer", "threading-many", ports, nports=n),
    ]
    for target in targets:
        target.cpus = cpus
    return targets


def measure_scale(
    target: ProcessTarget,
    n: int,
    binary: Path,
    plan: ScalePlan,
    host: str,
    generator_cpus: frozenset[int] | None = None,
) -> Record:
    """Start target with n listeners, measure it idle and under one rtt client (on
    `generator_cpus`, None: anywhere), stop it."""
    running = target.start()
    try:
        tree = ProcessTree(running.pid, memory=True)
        # Plain sleeps: the figures here are what the server does while left alone.
        time.sleep(plan.settle)
        before = tree.sample()
        time.sleep(plan.idle)
        after = tree.sample()
        record: Record = {
            "n": n,
            "target": target.name,
            "kind": target.kind,
            "ready_s": round(running.startup_s, 4),
            "rss_mb": round(after.rss_bytes / 2**20, 1),
            "pss_mb": round(after.pss_bytes / 2**20, 1),
            "processes": after.processes,
            "threads": after.threads,
            "idle_cpu_pct": round(after.cpu_pct_since(before), 2),
            "wakeups_per_s": round(after.wakeups_per_s_since(before), 1),
        }
        result = run_loadgen(binary, host, running.port, plan.dispatch_spec(generator_cpus))
        latency = result["latency_us"]
        record.update(
            rtt_per_sec=result["ops_per_sec"],
            rtt_p50_us=latency["p50"],
            rtt_p99_us=latency["p99"],
            rtt_errors=result["errors_total"],
        )
        return record
    finally:
        target.stop()


def run_dispatch(
    n: int,
    ports: PortAllocator,
    binary: Path,
    plan: ScalePlan,
    note: Note,
    progress: Note,
    host: str = "127.0.0.1",
    cpus: CpuSplit | None = None,
) -> Record | None:
    """What n registered listeners cost a dispatch: selectd with 1 listener and selectd with n,
    both running, take turns (in alternating order) at one-client rtt on their first listener.

    Returns {"n": n, "rounds": [{"1": figures, "n": figures}, ...]}, figures being rtt_per_sec
    and rtt_p50_us; report.dispatch_ratios() pairs them. None (with a note) when selectd cannot
    run here.
    """
    targets = [selectd_target(f"selectd N={size}", ports, size) for size in (1, n)]
    if reason := targets[0].unavailable():
        note(f"dispatch: skipped: {reason}")
        return None
    spec = plan.dispatch_spec(cpus.generator if cpus else None)
    rounds: list[Record] = []
    try:
        running = []
        for target in targets:
            target.cpus = cpus.servers if cpus else None
            running.append(target.start())
        for i in range(plan.dispatch_rounds):
            figures: Record = {}
            for key, run in [("1", running[0]), ("n", running[1])][:: -1 if i % 2 else 1]:
                result = run_loadgen(binary, host, run.port, spec)
                figures[key] = {
                    "rtt_per_sec": result["ops_per_sec"],
                    "rtt_p50_us": result["latency_us"]["p50"],
                }
            rounds.append(figures)
            progress(
                f"  dispatch round {i + 1}: rtt p50 {figures['1']['rtt_p50_us']:.0f}us with 1 "
                f"listener, {figures['n']['rtt_p50_us']:.0f}us with {n}"
            )
    except (TargetUnavailable, LoadgenError) as exc:
        note(f"dispatch: skipped: {exc}")
        return None
    finally:
        for target in targets:
            target.stop()
    return {"n": n, "rounds": rounds}


def run_scale(
    sizes: Sequence[int],
    ports: PortAllocator,
    binary: Path,
    plan: ScalePlan,
    note: Note,
    progress: Note,
    host: str = "127.0.0.1",
    cpus: CpuSplit | None = None,
) -> list[Record]:
    """Measure both contenders at every N; unavailable ones are skipped with a note. With `cpus`
    (--pin), the servers and the generator each run on their own CPUs."""
    records: list[Record] = []
    noted: set[str] = set()
    server_cpus = cpus.servers if cpus else None
    generator_cpus = cpus.generator if cpus else None
    for i, n in enumerate(sizes):
        targets = scale_targets(n, ports, server_cpus)
        # Alternate which goes first, as the throughput section does.
        for target in targets[i % 2 :] + targets[: i % 2]:
            if reason := target.unavailable():
                if target.name not in noted:
                    note(f"scale {target.name}: skipped: {reason}")
                    noted.add(target.name)
                continue
            try:
                record = measure_scale(target, n, binary, plan, host, generator_cpus)
            except (TargetUnavailable, LoadgenError) as exc:
                note(f"scale N={n} {target.name}: skipped: {exc}")
                continue
            records.append(record)
            progress(
                f"  N={n:<5} {target.name:<20} ready {record['ready_s'] * 1000:7.1f} ms"
                f"  rss {record['rss_mb']:6.1f} MB  idle cpu {record['idle_cpu_pct']:5.2f}%"
                f"  wake-ups {record['wakeups_per_s']:8.1f}/s"
                f"  rtt p50 {record['rtt_p50_us']:.0f}us p99 {record['rtt_p99_us']:.0f}us"
            )
    return records
