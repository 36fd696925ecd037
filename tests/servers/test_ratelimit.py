"""servers.ratelimit: one log line per interval, and the count of what it held back."""

from __future__ import annotations

import threading
import time

from servers.ratelimit import RateLimiter


def test_one_event_per_interval_then_the_count_of_the_rest() -> None:
    limiter = RateLimiter(interval=0.3)
    started = time.monotonic()
    assert limiter.allow() == 0  # the first goes through
    held = 0
    while time.monotonic() - started < 0.25:
        assert limiter.allow() is None  # within the interval: held back
        held += 1
    while (suppressed := limiter.allow()) is None:
        held += 1
    assert time.monotonic() - started >= 0.3
    assert suppressed == held  # the next line says how many it stands for
    assert limiter.allow() is None


def test_the_default_interval_is_five_seconds() -> None:
    # What README's "Guarantees" promises for EMFILE warnings: at most one per five seconds.
    assert RateLimiter().interval == 5.0


def test_threads_sharing_a_limiter_let_one_event_through() -> None:
    limiter = RateLimiter(interval=60)
    results: list[int | None] = []
    lock = threading.Lock()

    def hit() -> None:
        for _ in range(1000):
            outcome = limiter.allow()
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(0) == 1 and results.count(None) == 3999
