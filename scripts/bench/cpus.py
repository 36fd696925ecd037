"""--pin: the load generator on CPUs of its own, every server on the rest.

Usage:

    split = split_cpus(generator_threads=1)     # ValueError when there are too few CPUs
    with children_on(split.servers):
        popen = subprocess.Popen(argv)          # runs, and forks, on split.servers only

Without it, the generator and the server under test share every CPU, and on a small machine the
figure in rtt mode is partly the scheduler's: which of 32 workers land on the generator's CPU
changes from round to round, and moves round trips/s by up to 10% either way for servers that do
the same work per round trip. With the split, the generator is the client machine it stands in
for, each server gets the same CPUs in every round, and the paired ratios narrow to a few percent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs the load generator runs on, and which every server runs on."""

    generator: frozenset[int]
    servers: frozenset[int]

    def describe(self) -> str:
        return describe_split(self.generator, self.servers)

    def as_record(self) -> dict[str, list[int]]:
        return {"generator": sorted(self.generator), "servers": sorted(self.servers)}


def split_cpus(generator_threads: int, available: Set[int] | None = None) -> CpuSplit:
    """The lowest `generator_threads` CPUs of `available` (ours) for the generator, the rest for
    the servers; ValueError when that leaves the servers none."""
    cpus = sorted(os.sched_getaffinity(0) if available is None else available)
    if len(cpus) <= generator_threads:
        raise ValueError(
            f"--pin needs more CPUs than generator threads: {len(cpus)} CPU(s) for "
            f"{generator_threads} generator thread(s) would leave the servers none"
        )
    return CpuSplit(
        generator=frozenset(cpus[:generator_threads]),
        servers=frozenset(cpus[generator_threads:]),
    )


@contextmanager
def children_on(cpus: Set[int] | None) -> Iterator[None]:
    """Processes started in the block run on `cpus` (None: wherever we may run).

    The affinity is the calling thread's own for the block, which fork() passes on to the child,
    so a server is confined from its first instruction, with everything it forks, and no code
    runs between fork and exec. The thread's own affinity is restored after.
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def describe_split(generator: Iterable[int], servers: Iterable[int]) -> str:
    """A split in words: "the load generator on CPU 0, every server on CPU 1,2,3"."""
    return (
        f"the load generator on CPU {_listing(generator)}, every server on CPU {_listing(servers)}"
    )


def _listing(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
