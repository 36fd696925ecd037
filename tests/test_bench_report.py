"""The benchmark's pairing of figures: N listeners against 1 (report.dispatch_ratios), a peer
against its twin, the noise floor (report.ratios, cli.throughput_targets), and the fork pool
with and without its scheduling policy (--unbatched)."""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

from daemon.config import parse_config
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from bench.cli import throughput_targets
from bench.ports import PortAllocator
from bench.report import dispatch_line, dispatch_ratios, ratio_lines, ratios, summarize
from bench.selectd import SelectdTarget, selectd_config
from bench.targets import PEER, SELECTD, TWIN


def figures(p50_1: float, p50_n: float, rtt_1: float, rtt_n: float) -> dict[str, object]:
    return {
        "1": {"rtt_p50_us": p50_1, "rtt_per_sec": rtt_1},
        "n": {"rtt_p50_us": p50_n, "rtt_per_sec": rtt_n},
    }


def test_each_round_is_compared_with_itself_before_the_median() -> None:
    # The machine is slow in round 2 for both sides alike. Medians of each side would say N
    # costs 5% (57 us against 60 us, the wrong way round); per round it is +10%, 0 and -5%.
    rounds = [
        figures(50, 55, 20000, 18000),
        figures(80, 80, 12000, 12000),
        figures(60, 57, 16000, 16800),
    ]
    row = dispatch_ratios({"n": 1000, "rounds": rounds})
    assert row["p50_ratio"] == {"median": 1.0, "min": 0.95, "max": 1.1}
    assert row["rtt_ratio"] == {"median": 1.0, "min": 0.9, "max": 1.05}
    assert row["p50_us_1"] == {"median": 60.0, "min": 50.0, "max": 80.0}
    assert row["p50_us_n"] == {"median": 57.0, "min": 55.0, "max": 80.0}
    assert (row["n"], row["rounds"], row["figures"]) == (1000, 3, rounds)
    assert dispatch_line(row) == (
        "dispatch with 1000 listeners against 1: rtt p50 1.00x [0.95-1.10] "
        "(57 [55-80] us against 60 [50-80] us), rtt/s 1.00x [0.90-1.05] (3 rounds, 1 client)"
    )


def test_one_round_reads_as_one_figure() -> None:
    row = dispatch_ratios({"n": 10, "rounds": [figures(54, 56, 18000, 17600)]})
    assert dispatch_line(row) == (
        "dispatch with 10 listeners against 1: rtt p50 1.04x (56 us against 54 us), "
        "rtt/s 0.98x (1 round, 1 client)"
    )


def run(
    target: str,
    kind: str,
    repeat: int,
    ops: float,
    twin_of: str | None = None,
    mode: str = "rtt",
    starved: int = 0,
) -> dict:
    """One throughput record (throughput.to_record) with what ratios() and summarize() read."""
    return {
        "target": target,
        "kind": kind,
        "twin_of": twin_of,
        "mode": mode,
        "clients": 32,
        "repeat": repeat,
        "ops_per_sec": ops,
        "p50_us": 300.0,
        "p99_us": 700.0,
        "server_cpu_pct": 100.0,
        "loadgen_cpu_pct": 70.0,
        "other_cpu_pct": 0.0,
        "errors_total": 0,
        "per_conn_min": 0 if starved else 100,
        "per_conn_max": 200,
        "starved": starved,
        "loadgen_threads": 1,
    }


def test_a_twin_is_paired_with_its_original_alone() -> None:
    # Two stdlib peers, each with its twin, and selectd. A twin is neither selectd nor a peer:
    # it is compared with its own original only, and nothing is compared with it.
    records = []
    for repeat, (selectd, forking, twin) in enumerate(
        [(90.0, 100.0, 95.0), (110.0, 100.0, 105.0), (100.0, 80.0, 88.0)], start=1
    ):
        records += [
            run("selectd-fork", SELECTD, repeat, selectd),
            run("ForkingTCPServer", PEER, repeat, forking),
            run("ThreadingTCPServer", PEER, repeat, 50.0),
            run("ForkingTCPServer-twin", TWIN, repeat, twin, twin_of="ForkingTCPServer"),
            run("ThreadingTCPServer-twin", TWIN, repeat, 55.0, twin_of="ThreadingTCPServer"),
        ]
    rows = ratios(records, summarize(records))
    pairs = [(r["selectd"], r["peer"], r["twin"]) for r in rows]
    assert pairs == [
        ("selectd-fork", "ForkingTCPServer", False),
        ("selectd-fork", "ThreadingTCPServer", False),
        ("ForkingTCPServer-twin", "ForkingTCPServer", True),
        ("ThreadingTCPServer-twin", "ThreadingTCPServer", True),
    ]
    assert rows[2]["ratio"] == {"median": 1.05, "min": 0.95, "max": 1.1}
    assert rows[3]["ratio"] == {"median": 1.1, "min": 1.1, "max": 1.1}
    # Each selectd ratio ends with its peer's noise floor, to be read against it.
    assert ratio_lines(rows) == [
        "selectd-fork rtt/s vs ForkingTCPServer: 1.10x [0.90-1.25] "
        "(3 rounds, 32 clients, machine CPU per op 0.91x, noise floor 1.05x [0.95-1.10])",
        "selectd-fork rtt/s vs ThreadingTCPServer: 2.00x [1.80-2.20] "
        "(3 rounds, 32 clients, machine CPU per op 0.50x, noise floor 1.10x)",
        "ForkingTCPServer rtt/s vs a second ForkingTCPServer (noise floor): 1.05x [0.95-1.10] "
        "(3 rounds, 32 clients, machine CPU per op 0.95x)",
        "ThreadingTCPServer rtt/s vs a second ThreadingTCPServer (noise floor): 1.10x "
        "(3 rounds, 32 clients, machine CPU per op 0.91x)",
    ]


def test_twins_run_after_the_stdlib_peers_they_copy() -> None:
    ports = PortAllocator("127.0.0.1")
    names = [t.name for t in throughput_targets(ports, None, twins=True)]
    assert names == [
        "selectd-thread",
        "selectd-fork",
        "ThreadingTCPServer",
        "ForkingTCPServer",
        "ThreadingTCPServer-twin",
        "ForkingTCPServer-twin",
        "asyncio",
        "uvloop",
        "xinetd",
    ]
    only = ("selectd-fork", "forkingtcpserver", "asyncio")
    chosen = throughput_targets(ports, only, frozenset({1}), twins=True)
    assert [(t.name, t.kind, t.twin_of, t.cpus) for t in chosen] == [
        ("selectd-fork", SELECTD, None, frozenset({1})),
        ("ForkingTCPServer", PEER, None, frozenset({1})),
        ("ForkingTCPServer-twin", TWIN, "ForkingTCPServer", frozenset({1})),
        ("asyncio", PEER, None, frozenset({1})),
    ]
    assert [t.name for t in throughput_targets(ports, ("asyncio",), twins=True)] == ["asyncio"]


def test_unbatched_runs_the_fork_pool_again_without_its_policy_right_after_it() -> None:
    ports = PortAllocator("127.0.0.1")
    targets = throughput_targets(ports, None, unbatched=True)
    assert [t.name for t in targets][:4] == [
        "selectd-thread",
        "selectd-fork",
        "selectd-fork-unbatched",
        "ThreadingTCPServer",
    ]
    by_name = {t.name: t for t in targets}
    fork, unbatched = by_name["selectd-fork"], by_name["selectd-fork-unbatched"]
    assert isinstance(fork, SelectdTarget) and isinstance(unbatched, SelectdTarget)
    assert (fork.kind, unbatched.kind) == (SELECTD, SELECTD), "each is paired with every peer"
    assert (fork.scheduling_policy, unbatched.scheduling_policy) == ("batch", None)
    assert (unbatched.concurrency, unbatched.workers) == (fork.concurrency, fork.workers)
    assert by_name["selectd-thread"].scheduling_policy is None  # type: ignore[attr-defined]
    assert "selectd-fork-unbatched" not in {t.name for t in throughput_targets(ports, None)}


def test_the_daemon_config_sets_the_policy_only_when_given(tmp_path: Path) -> None:
    with_policy = selectd_config(
        tmp_path, "127.0.0.1", [9], concurrency="fork", workers=2, scheduling_policy="batch"
    )
    without = selectd_config(tmp_path, "127.0.0.1", [9], concurrency="fork", workers=2)
    assert with_policy["servers"]["echo"]["scheduling_policy"] == "batch"  # type: ignore[index]
    assert "scheduling_policy" not in without["servers"]["echo"]  # type: ignore[index]
    # What the target writes is a config the daemon takes.
    parse_config(tomli_w.dumps(with_policy))
