"""The speed targets selectd is held to, judged on one run's figures.

Usage:

    rows = judge(ratio_rows, summary, scale_records, dispatch, clients=32)
    print(verdict_table(rows))

Each row names a target, what it asks for, what the run measured (a median [min-max], or a
figure) and the verdict: HOLDS, MISSES, or NOT_MEASURED when the run did not take that figure
(a target left out with --only, a peer that was skipped, a run without the scale section).
A verdict reads the median alone. Where the peer also ran against a second copy of itself
(--twins), the row's note gives that noise floor: it says how far from 1 this machine alone
moved a ratio in the same rounds, and does not change the verdict.

The ratio targets are set at 32 clients, the idle ones at 1000 listeners; a run with other
figures (--quick, --clients) is judged at its own: `judge()` is told the client count, and the
idle rows name their N.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .report import fmt_ratio, markdown_table, noise_floors, text_table

Record = dict[str, Any]  # as stored in results.json

HOLDS = "holds"
MISSES = "misses"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class RatioTarget:
    """selectd's ops/s over a peer's, in one mode: at least `at_least` (the median)."""

    selectd: str
    peer: str
    mode: str
    at_least: float
    stretch: bool = False


THREAD, FORK = "selectd-thread", "selectd-fork"
POOLS = {THREAD: "thread pool", FORK: "fork pool"}
RATIO_TARGETS = (
    RatioTarget(THREAD, "ThreadingTCPServer", "conn", 2.0),
    RatioTarget(THREAD, "asyncio", "conn", 0.8),
    RatioTarget(THREAD, "ThreadingTCPServer", "rtt", 1.0),
    RatioTarget(FORK, "ForkingTCPServer", "conn", 6.0),
    RatioTarget(FORK, "xinetd", "conn", 2.0),
    RatioTarget(FORK, "ForkingTCPServer", "rtt", 1.0),
    RatioTarget(FORK, "uvloop", "conn", 1.0, stretch=True),
)

# The idle targets, for selectd with the largest N of the scale section.
IDLE_LISTENERS = 1000
IDLE_LIMITS = (  # what, the scale record's key, below what, its unit, digits shown
    ("ready", "ready_s", 2.0, " s", 3),
    ("wake-ups", "wakeups_per_s", 1.0, "/s", 1),
    ("CPU", "idle_cpu_pct", 0.5, "%", 2),
    ("RSS with workers", "rss_mb", 100.0, " MiB", 1),  # scale.py: the process and its children
)
MAX_DISPATCH_SLOWDOWN = 1.10  # rtt p50 with N listeners over that with 1


def judge(
    ratio_rows: Sequence[Record],
    summary: Sequence[Record],
    scale: Sequence[Record],
    dispatch: Record | None,
    clients: int,
) -> list[Record]:
    """Every target's row, in the order above: ratios, clients served, then idle and scale."""
    floors = noise_floors(ratio_rows)
    rows = [_ratio_row(t, ratio_rows, floors, clients) for t in RATIO_TARGETS]
    rows += [_served_row(name, summary, clients) for name in POOLS]
    rows += _idle_rows(scale)
    rows.append(_dispatch_row(dispatch))
    return rows


def _row(
    what: str, want: str, got: str | None, ok: bool, note: str = "", stretch: bool = False
) -> Record:
    return {
        "target": what,
        "want": want,
        "got": got if got is not None else "",
        "verdict": NOT_MEASURED if got is None else HOLDS if ok else MISSES,
        "note": note,
        "stretch": stretch,
    }


def _ratio_row(
    target: RatioTarget,
    ratio_rows: Sequence[Record],
    floors: Mapping[tuple[object, object, object], Record],
    clients: int,
) -> Record:
    key = (target.selectd, target.peer, target.mode, clients)
    row = next(
        (
            r
            for r in ratio_rows
            if (r["selectd"], r["peer"], r["mode"], r["clients"]) == key and r["ratio"]
        ),
        None,
    )
    want = f">= {target.at_least:g}x" + (" (stretch)" if target.stretch else "")
    unit = "conn/s" if target.mode == "conn" else "rtt/s"
    what = f"{POOLS[target.selectd]} {unit} vs {target.peer}"
    if row is None:
        return _row(what, want, None, False, stretch=target.stretch)
    notes = []
    floor = floors.get((target.peer, target.mode, clients))
    if floor is not None:
        notes.append(f"noise floor (two {target.peer}): {fmt_ratio(floor)}")
    if row.get("cost_ratio"):
        notes.append(f"machine CPU per op {row['cost_ratio']['median']:.2f}x")
    ok = row["ratio"]["median"] >= target.at_least
    return _row(what, want, fmt_ratio(row["ratio"]), ok, "; ".join(notes), target.stretch)


def _served_row(name: str, summary: Sequence[Record], clients: int) -> Record:
    what = f"{POOLS[name]}: every persistent client served"
    want = f"all {clients} get replies"
    for r in summary:
        if (r["target"], r["mode"], r["clients"]) == (name, "rtt", clients):
            got = f"{clients - r['starved_max']} of {clients}"
            note = f"fewest round trips for one client in a run: {r['per_conn_min']}"
            return _row(what, want, got, r["starved_max"] == 0, note)
    return _row(what, want, None, False)


def _idle_rows(scale: Sequence[Record]) -> list[Record]:
    ours = [r for r in scale if r["target"] == "selectd"]
    n = max((r["n"] for r in ours), default=IDLE_LISTENERS)
    record = next((r for r in ours if r["n"] == n), None)
    rows = []
    for what, key, limit, unit, digits in IDLE_LIMITS:
        want = f"< {limit:g}{unit}"
        if record is None:
            rows.append(_row(f"idle with {n} listeners: {what}", want, None, False))
            continue
        value = float(record[key])
        got = f"{value:.{digits}f}{unit}"
        rows.append(_row(f"idle with {n} listeners: {what}", want, got, value < limit))
    return rows


def _dispatch_row(dispatch: Record | None) -> Record:
    n = dispatch["n"] if dispatch else IDLE_LISTENERS
    what = f"dispatch: rtt p50 with {n} listeners against 1"
    want = f"<= {MAX_DISPATCH_SLOWDOWN:.2f}x"
    if dispatch is None:
        return _row(what, want, None, False)
    ratio = dispatch["p50_ratio"]
    return _row(what, want, fmt_ratio(ratio), ratio["median"] <= MAX_DISPATCH_SLOWDOWN)


VERDICT_HEAD = ("target", "wanted", "this run", "verdict", "note")


def verdict_table(rows: Sequence[Record], markdown: bool = False) -> str:
    table = markdown_table if markdown else text_table
    cells = [(r["target"], r["want"], r["got"] or "-", r["verdict"], r["note"]) for r in rows]
    return table(VERDICT_HEAD, cells)


def verdict_summary(rows: Sequence[Record]) -> str:
    """ "targets: 12 of 13 hold, 1 misses (fork pool rtt/s vs ForkingTCPServer). stretch goals:
    0 of 1 hold, 1 misses (fork pool conn/s vs uvloop)", with "N not measured" where so."""
    parts = []
    for label, stretch in (("targets", False), ("stretch goals", True)):
        mine = [r for r in rows if r["stretch"] == stretch]
        if not mine:
            continue
        held = sum(r["verdict"] == HOLDS for r in mine)
        missed = [r["target"] for r in mine if r["verdict"] == MISSES]
        unmeasured = sum(r["verdict"] == NOT_MEASURED for r in mine)
        text = f"{label}: {held} of {len(mine)} hold"
        if missed:
            text += (
                f", {len(missed)} {'misses' if len(missed) == 1 else 'miss'} ({'; '.join(missed)})"
            )
        if unmeasured:
            text += f", {unmeasured} not measured"
        parts.append(text)
    return ". ".join(parts)
