"""The daemon's stdio after a fork and at exit.

A fork worker's stdio and log lines never wait on a lock the fork caught, and a line a handler
prints is never held back. CPython does not reset a buffered file's lock in a forked child; the
script below makes that case for real: a thread of the parent blocks inside a write to
sys.stdout and another inside one to sys.stderr (each a pipe nobody reads yet), holding both
files' locks, and the parent forks. The child, as a fork worker does, takes fresh stdio and
loggers, then prints to both and logs a line. Once the parent drains the pipes, it must finish.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import tomli_w

from tests.conftest import REPO, daemon_section, echo_roundtrip, free_port, wait_for

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time, warnings
    from daemon import log

    # Python 3.12+ warns at a fork with threads running; shown here (in __main__), the warning
    # would wait on the very stderr lock this script holds until after the fork.
    warnings.simplefilter("ignore", DeprecationWarning)

    FRESH = sys.argv[1] == "fresh"
    WAIT = float(sys.argv[2])
    pipes = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        pipes[name] = r
        setattr(sys, name, open(fd, "w", closefd=False))
    log.configure("json", "info")  # the parent's loggers, on its sys.stderr

    def flood(stream):
        stream.write("x" * (1 << 20))  # far more than a pipe holds: blocks, holding the lock
        stream.flush()

    for stream in (sys.stdout, sys.stderr):
        threading.Thread(target=flood, args=(stream,), daemon=True).start()
    time.sleep(0.3)

    pid = os.fork()
    if pid == 0:
        if FRESH:
            log.configure("json", "info", log.fresh_stdio())
        print("child stdout")
        print("child stderr", file=sys.stderr)
        log.get_logger().info("child_logged")
        os._exit(0)

    def drain(fd):
        while os.read(fd, 1 << 16):
            pass

    for fd in pipes.values():
        threading.Thread(target=drain, args=(fd,), daemon=True).start()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os._exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os._exit(42)  # the child hung
    """
)


def run(mode: str, wait: float) -> int:
    """The script's exit status: the child's, or 42 when it had not finished `wait` seconds
    after the pipes were drained."""
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(wait)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=False,
    ).returncode


def test_a_forked_child_on_fresh_stdio_writes_while_the_parent_was_mid_write() -> None:
    assert run("fresh", wait=10) == 0


def test_without_fresh_stdio_the_same_child_hangs() -> None:
    # The case the fresh stdio is for: shows the script does catch the locks held.
    assert run("inherited", wait=1) == 42


PRINTING = '''
import os
import socketserver
import sys


class Printing(socketserver.StreamRequestHandler):
    """Prints each line it gets to stdout and to stderr, writes it to stdout's binary layer,
    then echoes it."""

    def handle(self):
        for line in self.rfile:
            text = line.decode().strip()
            print(f"out:{text}:{os.getpid()}")
            print(f"err:{text}:{os.getpid()}", file=sys.stderr)
            sys.stdout.buffer.write(f"bin:{text}:{os.getpid()}\\n".encode())
            self.wfile.write(line)
'''


@pytest.mark.parametrize("concurrency", ["inline", "thread", "fork"])
@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_what_a_handler_prints_comes_out_at_once(
    start_daemon,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: str,
    unbuffered: bool,
) -> None:
    # The daemon's stdout and stderr are a file here, as under systemd, not a terminal. Left
    # block-buffered, stdout would keep the line until 8 KiB had gathered, and a fork worker
    # would lose it when it leaves by os._exit(). Under PYTHONUNBUFFERED even binary writes go
    # out at once.
    if unbuffered:
        monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    else:
        monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    (tmp_path / "printing.py").write_text(PRINTING)
    port = free_port()
    server = {
        "listen": f"127.0.0.1:{port}",
        "handler": "printing:Printing",
        "concurrency": concurrency,
    }
    if concurrency != "inline":
        server["workers"] = 1
    daemon = start_daemon(daemon_section(tmp_path) + tomli_w.dumps({"servers": {"p": server}}))
    assert echo_roundtrip(port, b"marker-1\n") == b"marker-1\n"
    (serving,) = daemon.children() if concurrency == "fork" else [psutil.Process(daemon.pid)]
    for stream in ("out", "err", "bin") if unbuffered else ("out", "err"):
        wait_for(lambda s=stream: f"{s}:marker-1:{serving.pid}" in daemon.log_text(), timeout=5)
    assert daemon.stop() == 0


RELEASE = """
import sys
from daemon import log

sys.stdout.reconfigure(line_buffering=True)
try:
    print("a line to a reader that is gone")
except BrokenPipeError:
    pass
sys.stdout.write("and half a line, still in the buffer at exit")
if sys.argv[1] == "release":
    log.release_stdio()
"""


def test_release_stdio_lets_a_clean_exit_stay_clean_when_stdout_is_gone() -> None:
    def exit_status(mode: str) -> int:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
            return subprocess.run(
                [sys.executable, "-c", RELEASE, mode],
                cwd=REPO,
                env=env,
                stdout=write_end,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            ).returncode
        finally:
            os.close(write_end)

    assert exit_status("keep") == 120  # Python's own last flush failed
    assert exit_status("release") == 0


WARNING = """
import socketserver
import warnings


class Warns(socketserver.StreamRequestHandler):
    def handle(self):
        warnings.warn("frobnicate() is old", DeprecationWarning)
        self.wfile.write(self.rfile.readline())
"""


@pytest.mark.parametrize("concurrency", ["thread", "fork"])
def test_a_python_warning_is_a_log_event_not_a_raw_line(
    start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrency: str
) -> None:
    # With warnings shown (PYTHONWARNINGS, -W), Python prints them as raw text on stderr, in
    # the middle of the daemon's JSON lines, where a log shipper cannot parse them.
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    (tmp_path / "warns.py").write_text(WARNING)
    port = free_port()
    server = {"listen": f"127.0.0.1:{port}", "handler": "warns:Warns", "concurrency": concurrency}
    daemon = start_daemon(daemon_section(tmp_path) + tomli_w.dumps({"servers": {"p": server}}))
    assert echo_roundtrip(port) == b"hello\n"
    event = daemon.wait_event("python_warning", timeout=5)
    assert event["category"] == "DeprecationWarning"
    assert event["message"] == "frobnicate() is old"
    assert event["level"] == "warning"
    assert daemon.stop() == 0
    raw = [e["raw"] for e in daemon.events() if "raw" in e]
    assert not raw, f"lines that are not JSON: {raw}"
