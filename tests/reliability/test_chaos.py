"""scripts/chaos.py, briefly: it runs, injects its faults, stops everything and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil

from tests.conftest import REPO


def test_chaos_script_runs_briefly_and_reports() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--duration", "5", "--seed", "7", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("chaos summary")
    assert "result: PASS" in lines
    summary = json.loads(lines[-1])
    assert summary["result"] == "PASS" and summary["unexpected"] == []
    assert summary["requests"] > 100 and summary["ok"] > 0
    assert summary["faults"].get("SIGUSR2 upgrade") == 1
    assert len(summary["exits"]) == 2, "the old daemon and its successor"
    assert all(e["status"] == 0 for e in summary["exits"])
    for pid in summary["trend"]:  # every daemon process it started is gone
        try:
            assert psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
