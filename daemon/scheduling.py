"""A server's `scheduling_policy`: the kernel scheduling policy its requests run under.

It applies to what runs a request outside the loop: a fork pool's workers, a thread pool's
threads (Linux keeps a policy per thread), a command server's programs. The loop itself keeps
the daemon's own policy, so an inline server cannot have one.

- "other": the kernel's default (SCHED_OTHER), whatever the daemon runs under.
- "batch": SCHED_BATCH. A task woken (its client's data arrived) does not preempt the task
  running on that CPU; it runs when that one blocks or its slice ends. On a busy machine a fork
  worker then finishes its request before another takes the CPU, in one context switch where a
  preemption costs two; the price is up to a scheduler slice of latency, and only while every
  CPU is busy (README, "Scheduling policy").
- "idle": SCHED_IDLE, for work that should only use CPU nothing else wants.

Unset, everything inherits the daemon's policy (a unit's CPUSchedulingPolicy=, say).
"""

from __future__ import annotations

import os
import threading
from typing import Final

from .log import get_logger

log = get_logger()

POLICIES: Final = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def apply(policy: str | None, pid: int = 0) -> str | None:
    """Put `pid` (0: the calling thread) under `policy`; None when done or nothing to do, else
    why not (the kernel's refusal, e.g. an unprivileged daemon may not leave SCHED_IDLE)."""
    if policy is None:
        return None
    try:
        os.sched_setscheduler(pid, POLICIES[policy], os.sched_param(0))
    except ProcessLookupError:
        return None  # it has exited already: nothing left to run under any policy
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class PoolPolicy:
    """One pool's scheduling_policy: put each of its workers or threads under it; the kernel's
    first refusal is logged (scheduling_policy_failed), once per pool, and the worker or thread
    serves as it is. Thread-safe: a thread pool's threads apply it to themselves."""

    def __init__(self, server: str, config: object) -> None:
        self.server = server
        self.policy: str | None = getattr(config, "scheduling_policy", None)
        self._lock = threading.Lock()
        self._refused = False

    def apply(self, pid: int = 0) -> None:
        """Put `pid` (0: the calling thread) under the pool's policy."""
        why = apply(self.policy, pid)
        if why is None:
            return
        with self._lock:
            first, self._refused = not self._refused, True
        if first:
            log.warning(
                "scheduling_policy_failed", server=self.server, policy=self.policy, error=why
            )
