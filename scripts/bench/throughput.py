"""The throughput section: every target under the same load, alternating A/B over repeats.

Usage:

    plan = LoadPlan(modes=("conn", "rtt"), clients=(32,), repeats=3, duration=5.0)
    records = run_throughput(targets, plan, loadgen_binary, note=print)

Every target is started once and kept running (idle between its runs). Then, for each (clients,
mode) of the plan, the targets take turns: round r runs each of them once, in an order rotated
by r, so that a figure and its peer's are measured within seconds of each other. This machine's
speed drifts by a factor of two over minutes (a neighbour's load on the host), and what would
otherwise decide a ratio is which phase each side happened to run in; report.py compares each
round's figures with each other (paired ratios) before taking medians.

One record per run: the generator's figures plus the server's CPU over the measured window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .loadgen import DEFAULT_SOURCE_ADDRS, LoadgenError, LoadSpec, run_loadgen
from .proctree import ProcessTree, TreeSample, system_busy_s, wait_until_quiet
from .targets import Running, Target, TargetUnavailable

Record = dict[str, Any]  # as stored in results.json
Note = Callable[[str], None]
T = TypeVar("T")

# Above this share of one core used by neither server nor generator, a run counts as disturbed
# by the rest of the machine (some of it is the kernel's own softirq work, so it is rarely 0).
OTHER_BUSY_PCT = 25.0
# How long to wait for the machine to calm down before running a disturbed run again.
QUIET_WAIT = 10.0


@dataclass(frozen=True)
class LoadPlan:
    """What each target is put through, and how often."""

    modes: tuple[str, ...] = ("conn", "rtt")
    clients: tuple[int, ...] = (32,)
    repeats: int = 3
    duration: float = 5.0
    warmup: float = 0.5
    line_bytes: int = 64
    loadgen_threads: int = 1
    source_addrs: int = DEFAULT_SOURCE_ADDRS
    disturbed_retries: int = 2  # runs again a run that other processes disturbed, this often
    generator_cpus: frozenset[int] | None = None  # --pin: the generator's CPUs; None: any

    def spec(self, mode: str, clients: int, max_source_addrs: int | None = None) -> LoadSpec:
        source_addrs = self.source_addrs
        if max_source_addrs is not None:
            source_addrs = min(source_addrs, max_source_addrs)
        return LoadSpec(
            mode=mode,
            clients=clients,
            duration=self.duration,
            warmup=self.warmup,
            line_bytes=self.line_bytes,
            threads=self.loadgen_threads,
            source_addrs=source_addrs,
            cpus=self.generator_cpus,
        )


def _rotated(items: Sequence[T], by: int) -> list[T]:
    """items rotated left by `by` places: the A/B order of one round."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


@dataclass(frozen=True)
class Measured:
    """One generator run and the CPU use around it, in percent of one core."""

    result: dict[str, Any]  # the generator's JSON line
    server_cpu_pct: float
    machine_cpu_pct: float  # every process on the machine, generator and server included

    @property
    def other_cpu_pct(self) -> float:
        """CPU used by neither server nor generator: disturbance from the rest of the machine."""
        other = self.machine_cpu_pct - self.server_cpu_pct - float(self.result["cpu_pct"])
        return max(0.0, other)


def measure(binary: Path, host: str, running: Running, spec: LoadSpec) -> Measured:
    """One generator run against a started target, with the server's CPU over its window."""
    tree = ProcessTree(running.pid)
    samples: dict[str, tuple[TreeSample, float]] = {}

    def on_window(event: str) -> None:
        samples[event] = (tree.sample(), system_busy_s())

    result = run_loadgen(binary, host, running.port, spec, on_window=on_window)
    if "start" not in samples or "end" not in samples:
        return Measured(result, 0.0, 0.0)
    (tree0, busy0), (tree1, busy1) = samples["start"], samples["end"]
    wall = tree1.at - tree0.at
    machine = 100.0 * (busy1 - busy0) / wall if wall > 0 else 0.0
    return Measured(result, tree1.cpu_pct_since(tree0), machine)


def measure_undisturbed(
    binary: Path, host: str, running: Running, spec: LoadSpec, retries: int, progress: Note
) -> tuple[Measured, int]:
    """measure(), run again (up to retries times) while other processes disturb it.

    On a shared machine a neighbour's burst can halve a figure; the report still flags a run
    that stayed disturbed. Returns the last measurement and how many runs it took.
    """
    for attempt in range(retries + 1):
        measured = measure(binary, host, running, spec)
        if measured.other_cpu_pct <= OTHER_BUSY_PCT or attempt == retries:
            break
        busy = wait_until_quiet(OTHER_BUSY_PCT, QUIET_WAIT)
        progress(
            f"  (other processes used {measured.other_cpu_pct:.0f}% of a core during the run; "
            f"now {busy:.0f}%: running it again)"
        )
    return measured, attempt + 1


def to_record(target: Target, repeat: int, measured: Measured) -> Record:
    """Flatten one run into the record stored in results.json."""
    result = measured.result
    latency, per_conn = result["latency_us"], result["per_conn_ops"]
    return {
        "target": target.name,
        "kind": target.kind,
        "twin_of": target.twin_of,
        "mode": result["mode"],
        "clients": result["clients"],
        "repeat": repeat,
        "duration_s": result["duration_s"],
        "ops": result["ops"],
        "ops_per_sec": result["ops_per_sec"],
        "p50_us": latency["p50"],
        "p99_us": latency["p99"],
        "max_us": latency["max"],
        "errors_total": result["errors_total"],
        "errors": result["errors"],
        "warmup_errors": result["warmup_errors"],
        "per_conn_min": per_conn["min"],
        "per_conn_max": per_conn["max"],
        "starved": per_conn["starved"],
        "server_cpu_pct": round(measured.server_cpu_pct, 1),
        "loadgen_cpu_pct": result["cpu_pct"],
        "other_cpu_pct": round(measured.other_cpu_pct, 1),
        "loadgen_threads": result["threads"],
    }


def run_throughput(
    targets: Sequence[Target],
    plan: LoadPlan,
    binary: Path,
    note: Note,
    progress: Note,
    host: str = "127.0.0.1",
) -> list[Record]:
    """Run the plan over every available target; targets that fail are skipped with a note."""
    active = []
    for target in targets:
        if reason := target.unavailable():
            note(f"{target.name}: skipped: {reason}")
        else:
            active.append(target)
    records: list[Record] = []
    running: list[tuple[Target, Running]] = []
    try:
        for target in active:
            try:
                running.append((target, target.start()))
            except TargetUnavailable as exc:
                note(f"{target.name}: skipped: did not come up: {exc}")
        for clients in plan.clients:
            for mode in plan.modes:
                for repeat in range(1, plan.repeats + 1):
                    for target, started in _rotated(running, repeat - 1):
                        spec = plan.spec(mode, clients, target.max_source_addrs)
                        try:
                            measured, tries = measure_undisturbed(
                                binary, host, started, spec, plan.disturbed_retries, progress
                            )
                        except LoadgenError as exc:
                            note(f"{target.name} {mode} c={clients} repeat {repeat}: {exc}")
                            continue
                        record = to_record(target, repeat, measured)
                        record["tries"] = tries
                        record["source_addrs"] = spec.source_addrs
                        records.append(record)
                        progress(_progress_line(record))
    finally:
        for target, _started in running:
            target.stop()
    return records


def _progress_line(r: Record) -> str:
    return (
        f"  [{r['repeat']}] {r['target']:<23} {r['mode']:<4} c={r['clients']:<4}"
        f" {r['ops_per_sec']:>10.0f}/s  p50 {r['p50_us']:>8.0f}us  p99 {r['p99_us']:>8.0f}us"
        f"  err {r['errors_total']}  min/max {r['per_conn_min']}/{r['per_conn_max']}"
        f"  cpu srv {r['server_cpu_pct']:.0f}% gen {r['loadgen_cpu_pct']:.0f}%"
        f" other {r['other_cpu_pct']:.0f}%"
    )
