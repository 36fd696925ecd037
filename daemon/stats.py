"""Live figures: the `status` result and the Prometheus `metrics` text.

Process figures come from psutil. cpu_percent needs two samples, so the psutil.Process objects are
kept between calls: each status shows the CPU used since the previous one (the first shows 0.0).

The exposition format is prometheus_client's: a custom collector turns the daemon's own counters
into metric families at scrape time, so nothing is double-booked and nothing runs per request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .forkpool import ForkPool
from .listeners import DURATION_BUCKETS, State

if TYPE_CHECKING:
    from .supervisor import ServerUnit, Supervisor


class ProcessSampler:
    """psutil figures for the daemon and its workers, with cpu_percent across calls."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> dict[str, Any]:
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                return {
                    "rss": proc.memory_info().rss,
                    "cpu_percent": proc.cpu_percent(None),
                    "fds": proc.num_fds(),
                    "threads": proc.num_threads(),
                }
        except psutil.Error:
            self._procs.pop(pid, None)
            return {"rss": 0, "cpu_percent": 0.0, "fds": 0, "threads": 0}

    def forget_except(self, live: Iterable[int]) -> None:
        keep = set(live)
        for pid in list(self._procs):
            if pid not in keep:
                del self._procs[pid]


def server_status(unit: ServerUnit, sampler: ProcessSampler) -> dict[str, Any]:
    config = unit.config
    counters = unit.counters
    dispatcher = unit.dispatcher
    status: dict[str, Any] = {
        "state": unit.state.value,
        "listen": str(config.listen),
        "address": unit.address,
        "socket_type": config.socket_type,
        "concurrency": config.concurrency,
        "workers": config.workers,
        "requests": counters.requests,
        "completed": counters.completed,
        "errors": counters.errors,
        "denied": counters.denied,
        "rejected": counters.rejected,
        "refused": dict(counters.refused),
        "active": dispatcher.active() if dispatcher else 0,
        "queued": dispatcher.queued() if dispatcher else 0,
    }
    if isinstance(dispatcher, ForkPool):
        status["worker_processes"] = [
            {"pid": w.pid, "busy": w.busy, "requests": w.served, **_worker_figures(w.pid, sampler)}
            for w in dispatcher.workers()
        ]
    return status


def _worker_figures(pid: int, sampler: ProcessSampler) -> dict[str, Any]:
    figures = sampler.sample(pid)
    return {"rss": figures["rss"], "cpu_percent": figures["cpu_percent"]}


def daemon_status(supervisor: Supervisor, sampler: ProcessSampler) -> dict[str, Any]:
    figures = sampler.sample(os.getpid())
    return {
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(time.monotonic() - supervisor.started_at, 3),
        "config": supervisor.config.source,
        "phase": supervisor.phase.value,
        **figures,
    }


def status(supervisor: Supervisor, sampler: ProcessSampler, name: str | None) -> dict[str, Any]:
    units = supervisor.units
    selected = {name: units[name]} if name is not None else units
    result = {
        "daemon": daemon_status(supervisor, sampler),
        "servers": {n: server_status(u, sampler) for n, u in selected.items()},
    }
    sampler.forget_except(_live_pids(supervisor))
    return result


def _live_pids(supervisor: Supervisor) -> set[int]:
    pids = {os.getpid()}
    for unit in supervisor.units.values():
        if isinstance(unit.dispatcher, ForkPool):
            pids.update(w.pid for w in unit.dispatcher.workers())
    return pids


class _Collector:
    """Builds the metric families from the supervisor's state at each scrape."""

    def __init__(self, supervisor: Supervisor, sampler: ProcessSampler) -> None:
        self.supervisor = supervisor
        self.sampler = sampler

    def collect(self) -> Iterator[Metric]:
        units = self.supervisor.units
        counters = {
            "requests": CounterMetricFamily(
                "selectd_requests", "Requests taken and dispatched.", labels=["server"]
            ),
            "errors": CounterMetricFamily(
                "selectd_errors", "Requests whose handler failed.", labels=["server"]
            ),
            "denied": CounterMetricFamily(
                "selectd_denied", "Connections refused by allow/deny.", labels=["server"]
            ),
            "rejected": CounterMetricFamily(
                "selectd_rejected", "Requests refused: the queue was full.", labels=["server"]
            ),
        }
        refused = CounterMetricFamily(
            "selectd_refused",
            "Requests refused by a limit (instances, per_source, cps, access_times).",
            labels=["server", "reason"],
        )
        active = GaugeMetricFamily(
            "selectd_active_requests", "Requests running now.", labels=["server"]
        )
        queued = GaugeMetricFamily(
            "selectd_queued_requests", "Requests waiting for a worker.", labels=["server"]
        )
        up = GaugeMetricFamily(
            "selectd_server_up", "1 when the server is running.", labels=["server", "state"]
        )
        durations = HistogramMetricFamily(
            "selectd_request_duration_seconds",
            "Time spent running requests.",
            labels=["server"],
        )
        for name, unit in units.items():
            c = unit.counters
            for key, family in counters.items():
                family.add_metric([name], getattr(c, key))
            with c.lock:
                refusals = sorted(c.refused.items())
            for reason, count in refusals:
                refused.add_metric([name, reason], count)
            dispatcher = unit.dispatcher
            active.add_metric([name], dispatcher.active() if dispatcher else 0)
            queued.add_metric([name], dispatcher.queued() if dispatcher else 0)
            up.add_metric([name, unit.state.value], 1 if unit.state is State.RUNNING else 0)
            with c.lock:
                per_bucket = list(c.buckets)
                total = c.duration_sum
            cumulative, running = [], 0
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), per_bucket, strict=True):
                running += count
                cumulative.append((_le(bound), running))
            durations.add_metric([name], cumulative, total)
        yield from counters.values()
        yield refused
        yield active
        yield queued
        yield up
        yield durations
        yield from self._process_metrics()

    def _process_metrics(self) -> Iterator[Metric]:
        figures = self.sampler.sample(os.getpid())
        rss = GaugeMetricFamily(
            "selectd_process_resident_memory_bytes", "Resident memory.", labels=["process"]
        )
        rss.add_metric(["supervisor"], figures["rss"])
        workers_rss = 0
        for unit in self.supervisor.units.values():
            if isinstance(unit.dispatcher, ForkPool):
                for worker in unit.dispatcher.workers():
                    workers_rss += self.sampler.sample(worker.pid)["rss"]
        rss.add_metric(["workers"], workers_rss)
        yield rss
        fds = GaugeMetricFamily("selectd_process_open_fds", "Open file descriptors.")
        fds.add_metric([], figures["fds"])
        yield fds
        threads = GaugeMetricFamily("selectd_process_threads", "Threads.")
        threads.add_metric([], figures["threads"])
        yield threads
        uptime = GaugeMetricFamily("selectd_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], time.monotonic() - self.supervisor.started_at)
        yield uptime


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_text(supervisor: Supervisor, sampler: ProcessSampler) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(supervisor, sampler))  # type: ignore[arg-type]
    return generate_latest(registry).decode("utf-8")
