"""What a server costs: CPU, memory and wake-ups of a process and all its descendants.

Usage:

    tree = ProcessTree(pid)
    before = tree.sample()
    ...                                  # load the server
    after = tree.sample()
    cpu_pct = after.cpu_pct_since(before)

and, to end a server started with start_new_session=True together with everything it forked:

    terminate_tree(popen, grace=3.0)

Call become_subreaper() once at start-up so that the benchmark, not PID 1, inherits the orphans of
a server it kills: it can then reap them (a container's PID 1 often never does, and a zombie
left there looks like a leaked process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

_PR_SET_CHILD_SUBREAPER = 36

# How often ProcessTree.sample() reads the tree again when a child was reaped during a reading.
SAMPLE_TRIES = 20


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); True if that worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def system_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (anything but idle, iowait and steal)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def machine_busy_pct(seconds: float) -> float:
    """CPU the whole machine uses over the next seconds, in percent of one core."""
    before, started = system_busy_s(), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (system_busy_s() - before) / (time.monotonic() - started)


def wait_until_quiet(limit_pct: float, timeout: float, step: float = 0.5) -> float:
    """Wait up to timeout seconds for the machine to use under limit_pct; return its last use."""
    deadline = time.monotonic() + timeout
    while True:
        busy = machine_busy_pct(step)
        if busy < limit_pct or time.monotonic() >= deadline:
            return busy


@dataclass(frozen=True)
class TreeSample:
    """One reading of a process tree; compare two with the *_since methods."""

    at: float  # time.monotonic()
    cpu_s: float  # user + system of live processes, plus what they reaped from dead children
    voluntary_switches: int  # summed over every thread of every process
    rss_bytes: int
    pss_bytes: int  # proportional share: forked workers' shared pages counted once overall
    processes: int
    threads: int

    def cpu_pct_since(self, before: TreeSample) -> float:
        """CPU used between the samples, in percent of one core."""
        wall = self.at - before.at
        return 100.0 * (self.cpu_s - before.cpu_s) / wall if wall > 0 else 0.0

    def wakeups_per_s_since(self, before: TreeSample) -> float:
        """Voluntary context switches per second between the samples (each is one wake-up)."""
        wall = self.at - before.at
        return (self.voluntary_switches - before.voluntary_switches) / wall if wall > 0 else 0.0


def _voluntary_switches(pid: int) -> tuple[int, int]:
    """(switches summed over all threads, thread count) from /proc/PID/task/*/status.

    psutil's num_ctx_switches() reads /proc/PID/status, which counts the main thread only.
    """
    total = threads = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0, 0
    for task in tasks:
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # the thread ended between listing and reading
        threads += 1
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
                break
    return total, threads


class ProcessTree:
    """A root process and whatever it has forked, found afresh at every sample.

    The CPU figure adds each process's children_user/children_system (CPU of children it has
    already reaped), so a forking server's short-lived children are counted even though they are
    gone by the second sample. A live process's time is read in whole clock ticks, its reaped
    children's to the tick in total: a child alive at one sample and reaped by the next adds up
    to a tick (10 ms) it did not use, which for 32 forked handlers over a 3 s window reads a
    forking server's CPU about 5% high.
    """

    def __init__(self, pid: int, *, memory: bool = False) -> None:
        self.root = psutil.Process(pid)
        self.memory = memory  # PSS needs /proc/PID/smaps_rollup: slower, sample it only when asked

    def processes(self) -> list[psutil.Process]:
        """The root and its live descendants."""
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> TreeSample:
        """Read CPU, wake-ups and memory of the whole tree now.

        Children are read before their parents, so a child reaped during a reading is never
        missed; but it is then counted twice, in its own time and in its parent's children_*
        time. When 32 forked handlers exit together as the generator closes its connections,
        that read a forking server's CPU at up to 1.6 cores on one CPU. So a reading is taken
        again, up to SAMPLE_TRIES times, until no process reaped a child while it was taken.
        """
        for _ in range(SAMPLE_TRIES):
            procs = self.processes()
            reaped = _reaped_s(procs)
            sample = self._read(procs)
            if _reaped_s(procs) == reaped:
                break
        return sample

    def _read(self, procs: list[psutil.Process]) -> TreeSample:
        cpu = 0.0
        switches = rss = pss = threads = count = 0
        for proc in reversed(procs):
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                    rss += proc.memory_info().rss
                    if self.memory:
                        pss += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            s, n = _voluntary_switches(proc.pid)
            switches += s
            threads += n
            count += 1
        return TreeSample(time.monotonic(), cpu, switches, rss, pss, count, threads)


def _reaped_s(procs: list[psutil.Process]) -> float:
    """CPU seconds of the children these processes have reaped (the dead ones' count as 0)."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        total += t.children_user + t.children_system
    return total


def terminate_tree(popen: subprocess.Popen[bytes], grace: float = 3.0) -> list[int]:
    """Stop a server started with start_new_session=True, and everything it started.

    SIGTERM to its process group, SIGKILL to whatever is left after grace seconds (group and any
    descendant that moved to another group), then reap. Returns the pids still alive afterwards
    (empty unless something resisted SIGKILL or escaped this process's reach).
    """
    try:
        descendants = psutil.Process(popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    _signal_group(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(popen.pid, signal.SIGKILL)
    for proc in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the pid still names the same process
    if popen.poll() is None:
        popen.kill()
    popen.wait(timeout=grace)
    # Descendants are not our children (unless orphaned to us): there is nothing to wait on but
    # /proc, so poll it briefly. A zombie counts as gone: it runs nothing.
    deadline = time.monotonic() + grace
    alive = descendants
    while True:
        _reap(proc.pid for proc in alive)
        alive = [proc for proc in alive if _running(proc)]
        if not alive or time.monotonic() > deadline:
            return [proc.pid for proc in alive]
        time.sleep(0.01)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pids: Iterable[int]) -> None:
    """Collect orphans that re-parented to us (see become_subreaper); others are not ours."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap_orphans() -> int:
    """Reap zombie children of this process: orphans of killed servers (see become_subreaper).

    Call it only when no subprocess.Popen of ours is waiting to be waited for.
    Returns how many were reaped.
    """
    reaped = 0
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(child.pid, os.WNOHANG)
            reaped += 1
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return reaped
