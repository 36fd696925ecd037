"""The benchmark's process-tree CPU figure while a forking server's children exit and are reaped.

A real parent forks real children that burn CPU, then lets them exit one by one and reaps each at
once, while the test samples the tree as fast as it can: no sample may count a child twice (its
own time and, once reaped, its parent's children_* time).
"""

from __future__ import annotations

import itertools
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench.proctree import ProcessTree  # noqa: E402

CHILDREN = 32
BURN_S = 0.1  # CPU each child uses before it waits: ten clock ticks, well above their rounding
STAGGER_S = 0.01  # between one child's exit and the next

PARENT = textwrap.dedent(
    f"""
    import os, sys, time
    r, w = os.pipe()
    burnt_r, burnt_w = os.pipe()
    for i in range({CHILDREN}):
        if os.fork() == 0:
            os.close(w)
            end = time.thread_time() + {BURN_S}
            while time.thread_time() < end:
                pass
            os.write(burnt_w, b"b")
            os.read(r, 1)  # one byte each: they leave one at a time
            os._exit(0)
    for i in range({CHILDREN}):
        os.read(burnt_r, 1)
    print("burnt", flush=True)
    sys.stdin.readline()
    for i in range({CHILDREN}):
        os.write(w, b"x")
        os.wait()  # reaped at once, while the test may be reading the tree
        time.sleep({STAGGER_S})
    print("done", flush=True)
    sys.stdin.readline()
    """
)


def test_a_child_reaped_while_the_tree_is_read_is_counted_once() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin and parent.stdout
    try:
        assert parent.stdout.readline() == "burnt\n"  # every child has, and waits to leave
        tree = ProcessTree(parent.pid)
        settled = tree.sample()
        assert settled.cpu_s >= CHILDREN * BURN_S * 0.9, "the children did not burn their CPU"

        parent.stdin.write("go\n")
        parent.stdin.flush()
        samples = []
        deadline = time.monotonic() + 30
        while parent.poll() is None and time.monotonic() < deadline:
            samples.append(tree.sample())
            if len(samples) % 10 == 0 and _done(parent):
                break
        final = tree.sample()
    finally:
        parent.kill()
        parent.wait()
        parent.stdin.close()
        parent.stdout.close()

    assert len(samples) > CHILDREN, "the exits were not sampled while they happened"
    # Once all are reaped, the parent's children_* time holds every child's, to the tick.
    assert final.cpu_s == pytest.approx(settled.cpu_s + CHILDREN * 0.01, abs=CHILDREN * 0.01)
    assert final.cpu_s >= CHILDREN * BURN_S
    # No reading in between may count more than that: a child counted twice adds BURN_S at once,
    # and the next reading, with it counted once, is that much lower again.
    worst = max(s.cpu_s for s in samples)
    assert worst <= final.cpu_s + BURN_S / 2, (worst, final.cpu_s)
    figures = [settled.cpu_s, *(s.cpu_s for s in samples), final.cpu_s]
    drops = [round(a - b, 3) for a, b in itertools.pairwise(figures) if b < a - 0.03]
    assert not drops, f"readings fell back by {drops} s: a child was counted twice before"


def _done(parent: subprocess.Popen[str]) -> bool:
    """Whether the parent has said it reaped every child (without blocking when it has not)."""
    assert parent.stdout
    ready, _, _ = select.select([parent.stdout], [], [], 0)
    return bool(ready) and parent.stdout.readline() == "done\n"
