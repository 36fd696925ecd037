"""The benchmark's paired dispatch figure (report.dispatch_ratios): N listeners against 1."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from bench.report import dispatch_line, dispatch_ratios


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
