"""The benchmark's verdict on each speed target (bench/verdicts.py), from a run's records."""

from __future__ import annotations

import sys

from tests.conftest import REPO
from tests.test_bench_report import run

sys.path.insert(0, str(REPO / "scripts"))

from bench.report import ratios, summarize
from bench.targets import PEER, SELECTD, TWIN
from bench.verdicts import HOLDS, MISSES, NOT_MEASURED, judge, verdict_summary, verdict_table

# ops/s per round, by (target, mode). No asyncio: its target is not measured.
OPS = {
    ("selectd-thread", "conn"): (20000, 21000, 19000),
    ("selectd-thread", "rtt"): (100000, 120000, 90000),
    ("selectd-fork", "conn"): (15000, 16000, 14000),
    ("selectd-fork", "rtt"): (98000, 99000, 97000),
    ("ThreadingTCPServer", "conn"): (10000, 10000, 10000),  # 2.00x, 2.10x, 1.90x: exactly 2x
    ("ThreadingTCPServer", "rtt"): (100000, 100000, 100000),
    ("ForkingTCPServer", "conn"): (1000, 1000, 1000),
    ("ForkingTCPServer", "rtt"): (100000, 100000, 100000),  # fork pool: 0.98x, 0.99x, 0.97x
    ("ForkingTCPServer-twin", "rtt"): (80000, 125000, 100000),
    ("xinetd", "conn"): (4000, 4000, 4000),
    ("uvloop", "conn"): (25000, 25000, 25000),
}
KINDS = {"selectd-thread": SELECTD, "selectd-fork": SELECTD, "ForkingTCPServer-twin": TWIN}


def records(starved: dict[tuple[str, str], int] | None = None) -> list[dict]:
    out = []
    for (target, mode), rounds in OPS.items():
        kind = KINDS.get(target, PEER)
        twin_of = "ForkingTCPServer" if kind == TWIN else None
        for repeat, ops in enumerate(rounds):
            lost = (starved or {}).get((target, mode), 0) if repeat == 1 else 0
            out.append(run(target, kind, repeat, ops, twin_of, mode, lost))
    return out


def scale_record(target: str, n: int, **figures: float) -> dict:
    record = {"target": target, "n": n, "ready_s": 0.2, "rss_mb": 58.0}
    record.update({"idle_cpu_pct": 0.0, "wakeups_per_s": 0.0, **figures})
    return record


def verdicts(recs: list[dict], scale: list[dict] = (), dispatch: dict | None = None) -> dict:
    summary = summarize(recs)
    rows = judge(ratios(recs, summary), summary, list(scale), dispatch, 32)
    return {r["target"]: r for r in rows}


def test_each_ratio_target_is_judged_on_its_median() -> None:
    rows = verdicts(records())
    thread_conn = rows["thread pool conn/s vs ThreadingTCPServer"]
    assert (thread_conn["got"], thread_conn["verdict"]) == ("2.00x [1.90-2.10]", HOLDS)
    assert thread_conn["want"] == ">= 2x"
    assert rows["thread pool rtt/s vs ThreadingTCPServer"]["verdict"] == HOLDS  # 1.00x
    assert rows["fork pool conn/s vs ForkingTCPServer"]["got"] == "15.00x [14.00-16.00]"
    assert rows["fork pool conn/s vs xinetd"]["verdict"] == HOLDS  # 3.75x
    fork_rtt = rows["fork pool rtt/s vs ForkingTCPServer"]
    assert (fork_rtt["got"], fork_rtt["verdict"]) == ("0.98x [0.97-0.99]", MISSES)
    # Its peer ran twice: the noise floor is beside it, and does not change the verdict.
    assert fork_rtt["note"] == (
        "noise floor (two ForkingTCPServer): 1.00x [0.80-1.25]; machine CPU per op 1.02x"
    )
    assert rows["thread pool conn/s vs asyncio"]["verdict"] == NOT_MEASURED
    stretch = rows["fork pool conn/s vs uvloop"]
    assert (stretch["want"], stretch["verdict"]) == (">= 1x (stretch)", MISSES)
    for pool in ("thread pool", "fork pool"):
        served = rows[f"{pool}: every persistent client served"]
        assert (served["got"], served["verdict"]) == ("32 of 32", HOLDS)


def test_a_pool_that_leaves_clients_unserved_in_one_round_misses() -> None:
    rows = verdicts(records(starved={("selectd-fork", "rtt"): 3}))
    served = rows["fork pool: every persistent client served"]
    assert (served["got"], served["verdict"]) == ("29 of 32", MISSES)
    assert rows["thread pool: every persistent client served"]["verdict"] == HOLDS


def test_idle_targets_read_selectd_at_the_largest_n() -> None:
    scale = [
        scale_record("selectd", 10, rss_mb=31.0),
        scale_record("ThreadingTCPServer", 1000, wakeups_per_s=2091.0),  # not selectd's
        scale_record("selectd", 1000, ready_s=0.231, rss_mb=100.0, idle_cpu_pct=0.49),
    ]
    dispatch = {"n": 1000, "p50_ratio": {"median": 1.1, "min": 0.9, "max": 1.3}}
    rows = verdicts(records(), scale, dispatch)
    assert rows["idle with 1000 listeners: ready"]["got"] == "0.231 s"
    assert rows["idle with 1000 listeners: ready"]["verdict"] == HOLDS
    assert rows["idle with 1000 listeners: wake-ups"]["verdict"] == HOLDS
    assert rows["idle with 1000 listeners: CPU"]["verdict"] == HOLDS  # 0.49% < 0.5%
    rss = rows["idle with 1000 listeners: RSS with workers"]
    assert (rss["got"], rss["verdict"]) == ("100.0 MiB", MISSES)  # not under 100
    dispatch_row = rows["dispatch: rtt p50 with 1000 listeners against 1"]
    assert (dispatch_row["got"], dispatch_row["verdict"]) == ("1.10x [0.90-1.30]", HOLDS)


def test_a_run_without_the_scale_section_has_them_unmeasured() -> None:
    rows = judge([], [], [], None, 32)
    assert {r["verdict"] for r in rows} == {NOT_MEASURED}
    assert verdict_summary(rows) == (
        "targets: 0 of 13 hold, 13 not measured. stretch goals: 0 of 1 hold, 1 not measured"
    )


def test_the_summary_names_what_missed_and_counts_stretch_goals_apart() -> None:
    summary = summarize(records())
    rows = judge(ratios(records(), summary), summary, [], None, 32)
    assert verdict_summary(rows) == (
        "targets: 6 of 13 hold, 1 misses (fork pool rtt/s vs ForkingTCPServer), 6 not measured. "
        "stretch goals: 0 of 1 hold, 1 misses (fork pool conn/s vs uvloop)"
    )
    table = verdict_table(rows, markdown=True).splitlines()
    assert table[0] == "| target | wanted | this run | verdict | note |"
    assert (
        "| fork pool rtt/s vs ForkingTCPServer | >= 1x | 0.98x [0.97-0.99] | misses |" in (table[7])
    )
