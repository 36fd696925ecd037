"""Smoke test of the benchmark: `scripts/bench.py --quick` runs, reports, and cleans up.

It exercises the load generator's build, both load modes, selectd (thread and fork pools) and
two stdlib peers side by side (one of them twice, --twins), the paired ratios, the verdict on
each target and the results files. Every process the benchmark starts inherits a marker in its
environment, so the test can tell whether any of them outlived the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
MARK = "SELECTD_BENCH_SMOKE_RUN"


def marked_processes(token: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries MARK=token."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_quick_run_reports_and_leaves_nothing_running(tmp_path: Path) -> None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler to build the load generator (scripts/bench/loadgen.c)")
    token = uuid.uuid4().hex
    results = tmp_path / "results"
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH), "--quick", "--twins", "--results", str(results)],
            env={**os.environ, MARK: token},
            capture_output=True,
            text=True,
            timeout=100,  # under pytest's own 120 s, so a hang fails here with its output
            check=False,
        )
    finally:
        leftover = marked_processes(token)
        for p in leftover:
            p.kill()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not leftover, f"still running after the benchmark: {leftover}"

    data = json.loads((results / "results.json").read_text())
    assert (results / "results.md").read_text().startswith("# selectd benchmark")
    assert not [n for n in data["notes"] if "skipped" in n], data["notes"]
    for target in (
        "ThreadingTCPServer",
        "ThreadingTCPServer-twin",
        "asyncio",
        "selectd-thread",
        "selectd-fork",
    ):
        runs = [r for r in data["runs"] if r["target"] == target]
        assert {r["mode"] for r in runs} == {"conn", "rtt"}, target
        for run in runs:
            assert run["ops"] > 0, run
            assert run["errors_total"] == 0, run
            assert run["per_conn_min"] > 0, run  # every client was served
    pairs = {(r["selectd"], r["peer"], r["mode"]) for r in data["ratios"]}
    assert ("selectd-thread", "ThreadingTCPServer", "rtt") in pairs
    assert ("selectd-fork", "asyncio", "conn") in pairs
    # --twins: the second ThreadingTCPServer is measured against the first, and only that.
    twins = {(r["selectd"], r["peer"], r["mode"]) for r in data["ratios"] if r["twin"]}
    assert twins == {("ThreadingTCPServer-twin", "ThreadingTCPServer", m) for m in ("conn", "rtt")}
    assert "ThreadingTCPServer rtt/s vs a second ThreadingTCPServer (noise floor): " in proc.stdout
    for row in data["ratios"]:
        assert row["rounds"] == 1 and row["ratio"]["median"] > 0, row
        assert row["cost_ratio"]["median"] > 0, row  # each side's CPU per op was measured
    assert {r["target"] for r in data["scale"]} == {"ThreadingTCPServer", "selectd"}
    # The paired dispatch figure: selectd with 1 listener against selectd with N (10 in --quick).
    dispatch = data["dispatch"]
    assert (dispatch["n"], dispatch["rounds"]) == (10, 1), dispatch
    (figures,) = dispatch["figures"]
    for side in ("1", "n"):
        assert figures[side]["rtt_per_sec"] > 0 and figures[side]["rtt_p50_us"] > 0, figures
    assert dispatch["p50_ratio"]["median"] == round(
        figures["n"]["rtt_p50_us"] / figures["1"]["rtt_p50_us"], 2
    )
    assert "dispatch with 10 listeners against 1: rtt p50" in proc.stdout
    # Every target is judged on what the run measured (at its 4 clients), and said to be
    # unmeasured where the run left its peer out.
    targets = data["targets"]
    assert targets["clients"] == 4
    verdicts = {r["target"]: r["verdict"] for r in targets["rows"]}
    for measured in (
        "thread pool conn/s vs ThreadingTCPServer",
        "thread pool conn/s vs asyncio",
        "thread pool rtt/s vs ThreadingTCPServer",
        "idle with 10 listeners: ready",
        "dispatch: rtt p50 with 10 listeners against 1",
    ):
        assert verdicts[measured] in ("holds", "misses"), (measured, verdicts)
    assert verdicts["thread pool: every persistent client served"] == "holds"
    assert verdicts["fork pool: every persistent client served"] == "holds"
    assert verdicts["fork pool rtt/s vs ForkingTCPServer"] == "not measured"
    assert "targets, judged at 4 clients, on a --quick run's figures" in proc.stdout
    assert "\n## Targets\n" in (results / "results.md").read_text()
