"""Turn run records into figures: medians with ranges, selectd/peer ratios, tables and files.

Usage:

    summary = summarize(records)                # one row per (target, mode, clients)
    rows = ratios(records, summary)             # paired selectd/peer ratios
    dispatch = dispatch_ratios(record)          # N listeners against 1 (scale.run_dispatch)
    lines = ratio_lines(rows)  # ["selectd-thread conn/s vs ThreadingTCPServer: 2.30x [...] ...]
    print(throughput_table(summary))
    write_results(results_dir, payload, markdown)

Each figure of a row is {"median", "min", "max"} over the repeats; errors are summed, and
per-connection ops keep the worst minimum (0 means some client was never served).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .cpus import describe_split
from .targets import PEER, SELECTD, TWIN
from .throughput import OTHER_BUSY_PCT

# A run or summary row as stored in results.json: JSON values, read by key.
Record = dict[str, Any]

# Above this share of one core per generator thread the generator may be what limits the
# figure rather than the server.
LOADGEN_HOT_PCT = 70.0

_FIGURES = (
    "ops_per_sec",
    "p50_us",
    "p99_us",
    "server_cpu_pct",
    "loadgen_cpu_pct",
    "other_cpu_pct",
)
_UNITS = {"conn": "conn/s", "rtt": "rtt/s"}


def _spread(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summarize(records: Iterable[Record]) -> list[Record]:
    """Group runs by (target, mode, clients), in first-seen order, and reduce each group."""
    groups: dict[tuple[object, object, object], list[Record]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    rows = []
    for (target, mode, clients), runs in groups.items():
        row: Record = {
            "target": target,
            "kind": runs[0]["kind"],
            "twin_of": runs[0].get("twin_of"),
            "mode": mode,
            "clients": clients,
            "runs": len(runs),
        }
        for figure in _FIGURES:
            row[figure] = _spread([float(r[figure]) for r in runs])
        row["errors_total"] = sum(int(r["errors_total"]) for r in runs)
        row["per_conn_min"] = min(int(r["per_conn_min"]) for r in runs)
        row["per_conn_max"] = max(int(r["per_conn_max"]) for r in runs)
        row["starved_max"] = max(int(r["starved"]) for r in runs)
        row["loadgen_hot"] = any(
            float(r["loadgen_cpu_pct"]) > LOADGEN_HOT_PCT * int(r["loadgen_threads"]) for r in runs
        )
        rows.append(row)
    return rows


def _median(row: Record, figure: str) -> float:
    spread = row[figure]
    assert isinstance(spread, dict)
    return float(spread["median"])


def ratios(records: Sequence[Record], summary: Sequence[Record]) -> list[Record]:
    """selectd/peer ratios of ops/s for every selectd target, peer, mode and client count; then
    each twin's ratio to its original (the same server twice: how far from 1 the machine alone
    moves a ratio), marked "twin": True.

    Paired: each round's selectd figure over the same round's peer figure (the two ran within
    seconds of each other), then the median of those, with their min-max. `ratio_of_medians`
    is kept beside it for comparison.

    `cost_ratio` pairs what each op cost the whole machine (server, generator and kernel: CPU
    time over ops) the same way; under 1, selectd's ops are the cheaper. It still tells the two
    apart where ops/s cannot: when both servers are held to one rate by the generator, or by
    a machine with no CPU to spare.
    """
    ops: dict[tuple[object, object, object], dict[object, float]] = {}
    cost: dict[tuple[object, object, object], dict[object, float]] = {}
    for r in records:
        ops.setdefault(_key(r), {})[r["repeat"]] = float(r["ops_per_sec"])
        if r["ops_per_sec"]:
            machine = r["server_cpu_pct"] + r["loadgen_cpu_pct"] + r["other_cpu_pct"]
            cost.setdefault(_key(r), {})[r["repeat"]] = machine / r["ops_per_sec"]
    by_kind: dict[object, list[Record]] = {}
    for row in summary:
        by_kind.setdefault(row["kind"], []).append(row)
    pairs = [(s, p) for s in by_kind.get(SELECTD, []) for p in by_kind.get(PEER, [])]
    pairs += [
        (t, p)
        for t in by_kind.get(TWIN, [])
        for p in by_kind.get(PEER, [])
        if p["target"] == t["twin_of"]
    ]
    out = []
    for s, p in pairs:
        if (s["mode"], s["clients"]) != (p["mode"], p["clients"]):
            continue
        paired = _paired(ops[_key(s)], ops[_key(p)])
        costs = _paired(cost.get(_key(s), {}), cost.get(_key(p), {}))
        peer_median = _median(p, "ops_per_sec")
        out.append(
            {
                "selectd": s["target"],
                "peer": p["target"],
                "twin": s["kind"] == TWIN,
                "mode": s["mode"],
                "clients": s["clients"],
                "ratio": _spread(paired, 2) if paired else None,
                "cost_ratio": _spread(costs, 2) if costs else None,
                "rounds": len(paired),
                "ratio_of_medians": (
                    round(_median(s, "ops_per_sec") / peer_median, 2) if peer_median else None
                ),
                "selectd_starved": s["starved_max"],
                "peer_starved": p["starved_max"],
            }
        )
    return out


def _key(r: Record) -> tuple[object, object, object]:
    """What a run or a summary row is the figure of: (target, mode, clients)."""
    return (r["target"], r["mode"], r["clients"])


def _paired(mine: dict[object, float], theirs: dict[object, float]) -> list[float]:
    """mine[k] / theirs[k] for every round k both have (and theirs is not 0)."""
    return [mine[k] / theirs[k] for k in sorted(mine.keys() & theirs.keys()) if theirs[k]]


def noise_floors(rows: Sequence[Record]) -> dict[tuple[object, object, object], Record]:
    """(peer, mode, clients) -> the ratio of that peer's second copy to it (--twins), from
    ratios()'s rows: how far this machine alone moved a ratio against that peer."""
    return {
        (r["peer"], r["mode"], r["clients"]): r["ratio"]
        for r in rows
        if r.get("twin") and r["ratio"]
    }


def ratio_lines(rows: Sequence[Record]) -> list[str]:
    """One line per ratio (from ratios()):
    "selectd-thread conn/s vs ThreadingTCPServer: 2.30x [2.10-2.41] (5 rounds, 32 clients)", or
    for a twin "ThreadingTCPServer rtt/s vs a second ThreadingTCPServer (noise floor): ...". A
    ratio whose peer ran twice ends with that noise floor, to be read against it."""
    floors = noise_floors(rows)
    lines = []
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else fmt_ratio(r["ratio"])
        unit = _UNITS.get(str(r["mode"]), str(r["mode"]))
        caveats = [
            _count(r["rounds"], "round"),
            _count(r["clients"], "client"),
        ]
        if r.get("cost_ratio"):
            caveats.append(f"machine CPU per op {r['cost_ratio']['median']:.2f}x")
        # A server that leaves clients unserved can post a high rate from the ones it serves.
        for side in ("selectd", "peer"):
            if r[f"{side}_starved"]:
                caveats.append(f"{r[side]} left {r[f'{side}_starved']} unserved")
        if r.get("twin"):
            what = f"{r['peer']} {unit} vs a second {r['peer']} (noise floor)"
        else:
            what = f"{r['selectd']} {unit} vs {r['peer']}"
            if floor := floors.get((r["peer"], r["mode"], r["clients"])):
                caveats.append(f"noise floor {fmt_ratio(floor)}")
        lines.append(f"{what}: {ratio} ({', '.join(caveats)})")
    return lines


def dispatch_ratios(record: Record) -> Record:
    """Pair scale.run_dispatch()'s rounds: per round, the figure with N listeners over the one
    with 1, then the median [min-max] of those ("p50_ratio" over 1 means N made dispatch
    slower), beside each side's own spread."""
    rounds = record["rounds"]

    def side(key: str, figure: str) -> dict[str, float]:
        return _spread([float(r[key][figure]) for r in rounds])

    def paired(figure: str) -> dict[str, float]:
        return _spread([float(r["n"][figure]) / float(r["1"][figure]) for r in rounds], 2)

    return {
        "n": record["n"],
        "rounds": len(rounds),
        "p50_us_1": side("1", "rtt_p50_us"),
        "p50_us_n": side("n", "rtt_p50_us"),
        "p50_ratio": paired("rtt_p50_us"),
        "rtt_ratio": paired("rtt_per_sec"),
        "figures": rounds,
    }


def dispatch_line(row: Record) -> str:
    """ "dispatch with 1000 listeners against 1: rtt p50 1.01x [...], rtt/s 0.99x [...] (...)"."""
    return (
        f"dispatch with {row['n']} listeners against 1: rtt p50 {fmt_ratio(row['p50_ratio'])} "
        f"({_fmt_spread(row['p50_us_n'])} us against {_fmt_spread(row['p50_us_1'])} us), "
        f"rtt/s {fmt_ratio(row['rtt_ratio'])} ({_count(row['rounds'], 'round')}, 1 client)"
    )


def _count(n: int, noun: str) -> str:
    """ "1 round", "7 rounds"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def fmt_ratio(spread: Record) -> str:
    """ "1.02x [0.97-1.10]", or "1.02x" when the range is one value."""
    if spread["min"] == spread["max"]:
        return f"{spread['median']:.2f}x"
    return f"{spread['median']:.2f}x [{spread['min']:.2f}-{spread['max']:.2f}]"


def warning_lines(summary: Sequence[Record]) -> list[str]:
    """Warnings for rows whose figures may not be the server's alone."""
    out = []
    for r in summary:
        what = f"{r['target']} {r['mode']} c={r['clients']}"
        if r["loadgen_hot"]:
            out.append(
                f"warning: {what}: the load generator used up to "
                f"{r['loadgen_cpu_pct']['max']:.0f}% of a core (over {LOADGEN_HOT_PCT:.0f}% "
                "per thread): it may be the bottleneck"
            )
        if r["other_cpu_pct"]["max"] > OTHER_BUSY_PCT:
            out.append(
                f"warning: {what}: other processes used up to {r['other_cpu_pct']['max']:.0f}% "
                "of a core during a run: the machine was not quiet"
            )
        if r["starved_max"]:
            out.append(
                f"warning: {what}: {r['starved_max']} of {r['clients']} clients got no reply "
                "in a run (per-connection min 0)"
            )
    return out


def _fmt_spread(spread: object, digits: int = 0) -> str:
    assert isinstance(spread, dict)
    med, lo, hi = spread["median"], spread["min"], spread["max"]
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


_THROUGHPUT_HEAD = (
    "target",
    "mode",
    "clients",
    "ops/s median [min-max]",
    "p50 us",
    "p99 us",
    "errors",
    "per-conn min/max",
    "server CPU%",
    "loadgen CPU%",
    "other CPU%",
)


def _throughput_rows(summary: Sequence[Record]) -> list[tuple[str, ...]]:
    return [
        (
            str(r["target"]),
            _UNITS.get(str(r["mode"]), str(r["mode"])),
            str(r["clients"]),
            _fmt_spread(r["ops_per_sec"]),
            _fmt_spread(r["p50_us"]),
            _fmt_spread(r["p99_us"]),
            str(r["errors_total"]),
            f"{r['per_conn_min']}/{r['per_conn_max']}",
            _fmt_spread(r["server_cpu_pct"]),
            _fmt_spread(r["loadgen_cpu_pct"]) + (" !" if r["loadgen_hot"] else ""),
            _fmt_spread(r["other_cpu_pct"]),
        )
        for r in summary
    ]


_SCALE_HEAD = (
    "N",
    "target",
    "ready ms",
    "RSS MB",
    "PSS MB",
    "threads",
    "idle CPU%",
    "wake-ups/s",
    "rtt/s (1 client)",
    "rtt p50 us",
    "rtt p99 us",
)


def _scale_rows(records: Sequence[Record]) -> list[tuple[str, ...]]:
    return [
        (
            str(r["n"]),
            str(r["target"]),
            f"{float(r['ready_s']) * 1000:.1f}",
            f"{r['rss_mb']:.1f}",
            f"{r['pss_mb']:.1f}",
            str(r["threads"]),
            f"{r['idle_cpu_pct']:.2f}",
            f"{r['wakeups_per_s']:.1f}",
            f"{r['rtt_per_sec']:.0f}",
            f"{r['rtt_p50_us']:.0f}",
            f"{r['rtt_p99_us']:.0f}",
        )
        for r in records
    ]


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if c[:1].isdigit() else c.ljust(w)
            for c, w in zip(cells, widths, strict=True)
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def throughput_table(summary: Sequence[Record], markdown: bool = False) -> str:
    table = markdown_table if markdown else text_table
    return table(_THROUGHPUT_HEAD, _throughput_rows(summary)) if summary else "(no runs)"


def scale_table(records: Sequence[Record], markdown: bool = False) -> str:
    table = markdown_table if markdown else text_table
    return table(_SCALE_HEAD, _scale_rows(records)) if records else "(no runs)"


def markdown_report(
    meta: Record,
    summary: Sequence[Record],
    ratio_rows: Sequence[Record],
    scale: Sequence[Record],
    notes: Sequence[str],
    dispatch: Record | None = None,
    targets: Sequence[str] = (),
) -> str:
    """The whole report as markdown: setup, throughput, ratios, scale, dispatch, the targets
    (lines of markdown, from bench/verdicts.py), notes."""
    parts = [
        f"# selectd benchmark {meta['started']}",
        "",
        f"Host: {meta['host']}. Before the run: {meta['load']}, "
        f"{meta['busy_before_pct']:.0f}% of a core busy.",
        f"Options: {' '.join(meta['argv']) or '(none)'}.",
        *_pin_lines(meta.get("cpus")),
        "",
        "## Throughput",
        "",
        throughput_table(summary, markdown=True),
        "",
        "CPU% is percent of one core over the measured window; the server's includes all its "
        "children. `other` is the rest of the machine (other processes, kernel softirq work). "
        "`!` marks runs where the load generator used more than "
        f"{LOADGEN_HOT_PCT:.0f}% of a core per thread.",
        "",
        "## selectd / peer",
        "",
        "Each round ran every target once, one after the other; a ratio is the median over the "
        "rounds of selectd's figure divided by the peer's in the same round [min-max]."
        + (
            " A noise floor is a peer measured against a second copy of itself (`-twin`, "
            "--twins) in the same rounds: ratios that far from 1 are the machine's, not the "
            "servers'."
            if any(r.get("twin") for r in ratio_rows)
            else ""
        ),
        "",
        *(f"- {line}" for line in ratio_lines(ratio_rows) or ["(no selectd figures)"]),
        "",
    ]
    if scale:
        parts += ["## Idle and scale", "", scale_table(scale, markdown=True), ""]
    if dispatch:
        parts += [
            f"Paired: {dispatch_line(dispatch)}. Each round ran selectd with one listener and "
            f"selectd with {dispatch['n']} one after the other; a ratio is the median over the "
            "rounds of the second's figure divided by the first's [min-max].",
            "",
        ]
    if targets:
        parts += ["## Targets", "", *targets, ""]
    if notes:
        parts += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


def _pin_lines(cpus: Record | None) -> list[str]:
    """The report's line on --pin, when the run was pinned."""
    if not cpus:
        return []
    return [f"Pinned (--pin): {describe_split(cpus['generator'], cpus['servers'])}."]


def write_results(directory: Path, payload: Record, markdown: str) -> tuple[Path, Path]:
    """Write results.json and results.md into directory (created); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "results.json", directory / "results.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
