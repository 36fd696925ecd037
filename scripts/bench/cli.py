"""Command line: run selectd and its peers side by side and report.

Usage:

    python3 scripts/bench.py                     # full run: throughput (32 clients) + scale
    python3 scripts/bench.py --quick             # ~15 s smoke run for CI
    python3 scripts/bench.py --only ThreadingTCPServer,selectd-thread --repeats 5
    python3 scripts/bench.py --sweep             # clients 1, 8, 32, 128
    python3 scripts/bench.py --scale             # the idle and scale section only
    python3 scripts/bench.py --pin               # generator on a CPU of its own (bench/cpus.py)
    python3 scripts/bench.py --twins             # + second Threading/ForkingTCPServer: noise floor
    python3 scripts/bench.py --unbatched         # + the fork pool without scheduling_policy

Results go to --results DIR (default results/bench-<timestamp>/): results.json and results.md.
Exit status: 0 when the run completed (skipped targets are notes, not failures), 2 when it could
not run at all (no C compiler, bad arguments).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .cpus import CpuSplit, split_cpus
from .loadgen import DEFAULT_SOURCE_ADDRS, LoadgenError, build_loadgen
from .ports import PortAllocator
from .proctree import become_subreaper, machine_busy_pct, reap_orphans
from .report import (
    dispatch_line,
    dispatch_ratios,
    markdown_report,
    ratio_lines,
    ratios,
    scale_table,
    summarize,
    throughput_table,
    warning_lines,
    write_results,
)
from .scale import ScalePlan, run_dispatch, run_scale
from .selectd import FORK_POLICY, FORK_WORKERS, THREAD_WORKERS, SelectdTarget
from .targets import REPO_DIR, PeerTarget, ProcessTarget
from .throughput import OTHER_BUSY_PCT, LoadPlan, run_throughput
from .verdicts import judge, verdict_summary, verdict_table
from .xinetd import XinetdTarget

HOST = "127.0.0.1"
SWEEP_CLIENTS = (1, 8, 32, 128)
TARGET_CLIENTS = 32  # the speed targets (bench/verdicts.py) are set at this many clients
QUICK_CAVEAT = ", on a --quick run's figures: too short and too few to hold anything to"
SCALE_SIZES = (10, 100, 1000)
QUICK_TARGETS = ("ThreadingTCPServer", "asyncio", "selectd-thread", "selectd-fork")
# The peers --twins runs twice: those of the rtt/s targets, which sit at 1x.
TWINNED_PEERS = ("threading", "forking")


@dataclass(frozen=True)
class Settings:
    """Everything a run does, resolved from the arguments."""

    plan: LoadPlan
    only: tuple[str, ...] | None  # target names, lower-cased; None: all
    twins: bool  # --twins
    unbatched: bool  # --unbatched
    throughput: bool
    scale_sizes: tuple[int, ...]
    scale_plan: ScalePlan
    results: Path
    cpus: CpuSplit | None  # --pin; None: generator and servers share every CPU


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark selectd against stdlib and xinetd peers."
    )
    parser.add_argument("--quick", action="store_true", help="tiny CI run (~15 s)")
    parser.add_argument("--only", help="comma-separated target names (case-insensitive)")
    parser.add_argument("--results", type=Path, help="output directory")
    parser.add_argument("--duration", type=float, help="measured seconds per run (3; quick 0.5)")
    parser.add_argument("--repeats", type=int, help="A/B rounds (5; quick 1)")
    parser.add_argument("--clients", type=int, help="concurrent clients (32; quick 4)")
    parser.add_argument("--sweep", action="store_true", help="clients 1, 8, 32, 128")
    parser.add_argument("--line-bytes", type=int, default=64, help="bytes per line (64)")
    parser.add_argument("--loadgen-threads", type=int, default=1, help="generator threads (1)")
    parser.add_argument(
        "--source-addrs",
        type=int,
        help=f"conn mode: spread connections over 127.0.0.1..K ({DEFAULT_SOURCE_ADDRS}; xinetd: 1)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="generator on CPUs of its own (one per thread), every server on the rest",
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="also run a second copy of ThreadingTCPServer and ForkingTCPServer: how far from 1 "
        "two identical servers read (the noise floor of a ratio)",
    )
    parser.add_argument(
        "--unbatched",
        action="store_true",
        help=f"also run the fork pool without its scheduling_policy ({FORK_POLICY}), under the "
        "kernel's default: what the policy buys, paired in the same rounds",
    )
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--scale", action="store_true", help="only the idle and scale section")
    section.add_argument("--no-scale", action="store_true", help="skip the idle and scale section")
    args = parser.parse_args(argv)
    for name in ("duration", "repeats", "clients", "line_bytes", "loadgen_threads", "source_addrs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.pin:
        try:
            split_cpus(args.loadgen_threads)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    if args.sweep:
        clients: tuple[int, ...] = SWEEP_CLIENTS
    else:
        clients = (args.clients or (4 if quick else 32),)
    cpus = split_cpus(args.loadgen_threads) if args.pin else None
    plan = LoadPlan(
        clients=clients,
        repeats=args.repeats or (1 if quick else 5),
        duration=args.duration or (0.5 if quick else 3.0),
        warmup=0.2 if quick else 0.5,
        disturbed_retries=0 if quick else 2,  # quick stays bounded for CI
        line_bytes=args.line_bytes,
        loadgen_threads=args.loadgen_threads,
        source_addrs=args.source_addrs or DEFAULT_SOURCE_ADDRS,
        generator_cpus=cpus.generator if cpus else None,
    )
    only: tuple[str, ...] | None = None
    if args.only:
        only = tuple(n.strip().lower() for n in args.only.split(",") if n.strip())
    elif quick:
        only = tuple(n.lower() for n in QUICK_TARGETS)
    # The scale section runs in a full run, with --scale, and in --quick (N=10 only); not when
    # --only narrows the run to some targets, unless --scale asks for it.
    run_scale_section = args.scale or (not args.no_scale and (quick or args.only is None))
    scale_plan = (
        ScalePlan(settle=0.2, idle=0.5, dispatch_duration=0.5, warmup=0.2, dispatch_rounds=1)
        if quick
        else ScalePlan(dispatch_duration=args.duration or 3.0, dispatch_rounds=plan.repeats)
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Settings(
        plan=plan,
        only=only,
        twins=args.twins,
        unbatched=args.unbatched,
        throughput=not args.scale,
        scale_sizes=((10,) if quick else SCALE_SIZES) if run_scale_section else (),
        scale_plan=scale_plan,
        results=args.results or REPO_DIR / "results" / f"bench-{stamp}",
        cpus=cpus,
    )


def throughput_targets(
    ports: PortAllocator,
    only: tuple[str, ...] | None,
    cpus: frozenset[int] | None = None,
    twins: bool = False,
    unbatched: bool = False,
) -> list[ProcessTarget]:
    """The throughput section's targets, in their first-repeat order, filtered by --only, each
    to run on `cpus` (None: anywhere); with `twins`, a twin of each TWINNED_PEERS peer follows
    the last of them, so that it runs about as far from its original as selectd's targets run
    from theirs; with `unbatched`, the fork pool also runs without its policy, right after it."""
    fork = functools.partial(SelectdTarget, concurrency="fork", workers=FORK_WORKERS)
    targets: list[ProcessTarget] = [
        SelectdTarget("selectd-thread", ports, concurrency="thread", workers=THREAD_WORKERS),
        fork("selectd-fork", ports, scheduling_policy=FORK_POLICY),
        *([fork("selectd-fork-unbatched", ports)] if unbatched else []),
        PeerTarget("ThreadingTCPServer", "threading", ports),
        PeerTarget("ForkingTCPServer", "forking", ports),
        PeerTarget("asyncio", "asyncio", ports),
        PeerTarget("uvloop", "uvloop", ports),
        XinetdTarget(ports),
    ]
    if only is not None:
        unknown = set(only) - {t.name.lower() for t in targets}
        if unknown:
            print(f"bench: unknown target(s) {', '.join(sorted(unknown))}", file=sys.stderr)
            raise SystemExit(2)
        targets = [t for t in targets if t.name.lower() in only]
    if twins:
        twinned = [t for t in targets if isinstance(t, PeerTarget) and t.peer in TWINNED_PEERS]
        if twinned:
            at = targets.index(twinned[-1]) + 1
            targets[at:at] = [t.twin() for t in twinned]
    for target in targets:
        target.cpus = cpus
    return targets


def judged_clients(clients: Sequence[int]) -> int:
    """The client count the targets are judged at: 32, where they are set, when the run has it."""
    return TARGET_CLIENTS if TARGET_CLIENTS in clients else clients[0]


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, for us and every child (N=1000 listeners)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # Unwind through the finally blocks that stop the targets, as Ctrl-C does.
    raise SystemExit(128 + signum)


def machine() -> dict[str, Any]:
    return {
        "host": f"{platform.node()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load": "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings_from(args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    subreaper = become_subreaper()
    nofile = raise_nofile_limit()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        print(f"note: {text}", flush=True)

    def progress(text: str) -> None:
        print(text, flush=True)

    try:
        binary = build_loadgen()
    except LoadgenError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    meta_start = machine()
    baseline = machine_busy_pct(0.3 if args.quick else 1.0)
    if baseline > OTHER_BUSY_PCT:
        note(
            f"the machine is busy before the run: {baseline:.0f}% of a core in use; "
            "figures will vary more than usual"
        )
    if settings.cpus:
        print(f"pinned: {settings.cpus.describe()}", flush=True)
    ports = PortAllocator(HOST)
    plan = settings.plan
    records: list[dict[str, Any]] = []
    scale_records: list[dict[str, Any]] = []
    dispatch: dict[str, Any] | None = None
    clock = time.monotonic()
    try:
        if settings.throughput:
            targets = throughput_targets(
                ports,
                settings.only,
                settings.cpus.servers if settings.cpus else None,
                settings.twins,
                settings.unbatched,
            )
            print(
                f"throughput: {len(targets)} targets x {plan.repeats} repeats, modes "
                f"{'/'.join(plan.modes)}, clients {','.join(map(str, plan.clients))}, "
                f"{plan.duration:g} s each, {plan.line_bytes} B lines",
                flush=True,
            )
            records = run_throughput(targets, plan, binary, note, progress, HOST)
        if settings.scale_sizes:
            print(f"scale: N = {', '.join(map(str, settings.scale_sizes))}", flush=True)
            scale_records = run_scale(
                settings.scale_sizes,
                ports,
                binary,
                settings.scale_plan,
                note,
                progress,
                HOST,
                settings.cpus,
            )
            n = max(settings.scale_sizes)
            print(f"dispatch: selectd with 1 listener against {n}", flush=True)
            rounds = run_dispatch(
                n, ports, binary, settings.scale_plan, note, progress, HOST, settings.cpus
            )
            dispatch = dispatch_ratios(rounds) if rounds else None
    finally:
        reap_orphans()

    summary = summarize(records)
    ratio_rows = ratios(records, summary)
    judged = judged_clients(plan.clients)
    verdicts = judge(ratio_rows, summary, scale_records, dispatch, judged)
    for warning in warning_lines(summary):
        note(warning)
    meta = {
        "started": started,
        "elapsed_s": round(time.monotonic() - clock, 1),
        **meta_start,
        "load_after": machine()["load"],
        "busy_before_pct": round(baseline, 1),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "plan": {
            "modes": plan.modes,
            "clients": plan.clients,
            "repeats": plan.repeats,
            "duration_s": plan.duration,
            "warmup_s": plan.warmup,
            "line_bytes": plan.line_bytes,
            "loadgen_threads": plan.loadgen_threads,
            "source_addrs": plan.source_addrs,
            "scale_sizes": settings.scale_sizes,
            "twins": settings.twins,
            "unbatched": settings.unbatched,
        },
        "loadgen": str(binary),
        "cpus": settings.cpus.as_record() if settings.cpus else None,
        "subreaper": subreaper,
        "nofile": nofile,
    }
    print()
    print(throughput_table(summary))
    print()
    for line in ratio_lines(ratio_rows) or ["selectd/peer ratios: no selectd figures (see notes)"]:
        print(line)
    if scale_records:
        print()
        print(scale_table(scale_records))
    if dispatch:
        print(dispatch_line(dispatch))
    judged_how = f"judged at {judged} clients" + (QUICK_CAVEAT if args.quick else "")
    print(f"\ntargets, {judged_how}:")
    print(verdict_table(verdicts))
    print(verdict_summary(verdicts))
    payload = {
        "meta": meta,
        "runs": records,
        "summary": summary,
        "ratios": ratio_rows,
        "scale": scale_records,
        "dispatch": dispatch,
        "targets": {"clients": judged, "rows": verdicts},
        "notes": notes,
    }
    json_path, md_path = write_results(
        settings.results,
        payload,
        markdown_report(
            meta,
            summary,
            ratio_rows,
            scale_records,
            notes,
            dispatch,
            targets=[
                f"Each on its median, {judged_how} (bench/verdicts.py).",
                "",
                verdict_table(verdicts, markdown=True),
                "",
                verdict_summary(verdicts) + ".",
            ],
        ),
    )
    print(f"\nresults: {json_path} {md_path}")
    return 0
