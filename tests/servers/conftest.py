"""Fixtures for the servers tests.

- `no_leaks` (autouse): each test must leave no descriptors, threads or child processes behind.
- `harness`: builds servers that are closed at teardown, and runs serve_forever() in a thread that
  is shut down and joined at teardown.
- `sockdir`: a short directory for Unix socket paths.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers_testing import Harness, children, open_fds, wait_for


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves descriptors, threads or child processes behind."""
    fds_before = open_fds()
    threads_before = set(threading.enumerate())
    yield

    def new_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t not in threads_before}

    wait_for(lambda: not new_threads(), 10, message=lambda: f"threads to end: {new_threads()}")

    def new_fds() -> dict[int, str]:
        return {fd: what for fd, what in open_fds().items() if fds_before.get(fd) != what}

    wait_for(lambda: not new_fds(), 5, message=lambda: f"descriptors to close: {new_fds()}")
    wait_for(lambda: not children(), 5, message=lambda: f"child processes to go: {children()}")


@pytest.fixture
def harness(no_leaks: None) -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets: sun_path holds 108 bytes, tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="srv-", dir="/tmp"))
    try:
        yield path
    finally:
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()
