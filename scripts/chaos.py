#!/usr/bin/env python3
"""Run selectd under mixed load and random faults, then say what broke.

    python3 scripts/chaos.py [--duration SECONDS] [--seed N] [--no-upgrade] [--json]

It starts a daemon from a temporary config (thread, fork, inline and UDP echo servers, plus one
server the faults stop and pause), drives load at it from a few client threads, and injects
faults at random: SIGKILL of a fork worker, SIGHUP and `reload` with servers added and removed,
stop/start and pause/resume through the control socket, silent and trickling slow clients, and
one SIGUSR2 upgrade halfway through. Meanwhile it samples the daemon's RSS and descriptor count.
At the end it stops the daemon gracefully and prints a summary: requests, failures by server
and cause, the faults, the RSS/fd trend and the daemon's exit status.

Exit status 0 when every daemon process exited 0 and no failure was unexpected. Expected
failures are: refusals on the server that was stopped on purpose, at most one lost request per
fork worker killed, and UDP datagrams lost under load (up to 1%). Everything else (a request on
an untouched server that failed, a reply that came back wrong, a silent or trickling client
never cut off) is unexpected. The script stops everything it started, also when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

REPO = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36
CLIENT_TIMEOUT = 5.0
SLOW_TIMEOUT = 1.0  # the `timeout` of the server slow clients go to
UDP_LOSS_ALLOWED = 0.01

HANDLERS = '''
import socketserver


class LineEcho(socketserver.StreamRequestHandler):
    """Echoes one line."""

    def handle(self):
        self.wfile.write(self.rfile.readline())
'''


# -- the daemon --------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    thread: int = field(default_factory=free_port)
    fork: int = field(default_factory=free_port)
    inline: int = field(default_factory=free_port)
    udp: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    toggle: int = field(default_factory=free_port)
    extra: int = field(default_factory=free_port)


def config_text(workdir: Path, ports: Ports, extra: bool, thread_workers: int) -> str:
    servers: dict[str, Any] = {
        "thread": {
            "listen": f"127.0.0.1:{ports.thread}",
            "handler": "chaoshandlers:LineEcho",
            "workers": thread_workers,
            "timeout": SLOW_TIMEOUT,
        },
        "fork": {
            "listen": f"127.0.0.1:{ports.fork}",
            "handler": "chaoshandlers:LineEcho",
            "concurrency": "fork",
            "workers": 3,
            "timeout": 2,
            # As the benchmark runs its fork pool: replaced workers must get it too.
            "scheduling_policy": "batch",
        },
        "inline": {
            "listen": f"127.0.0.1:{ports.inline}",
            "handler": "echo",
            "concurrency": "inline",
            "timeout": 1,
        },
        "udp": {"listen": f"127.0.0.1:{ports.udp}", "handler": "echo", "socket_type": "dgram"},
        "toggle": {"listen": f"127.0.0.1:{ports.toggle}", "handler": "echo"},
    }
    if extra:
        servers["extra"] = {"listen": f"127.0.0.1:{ports.extra}", "handler": "echo"}
    daemon = {
        "control_socket": str(workdir / "control.sock"),
        "log_format": "json",
        "log_level": "info",
        "shutdown_timeout": 10,
    }
    return tomli_w.dumps({"daemon": daemon, "servers": servers})


class Control:
    """The daemon's control socket, one request per connection."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, command: str, **args: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.path)
            s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
            return json.loads(s.makefile("rb").readline())


def become_subreaper() -> bool:
    """Adopt orphaned descendants: the upgrade's successor becomes our child once the old daemon
    exits, so we can wait for it (and learn its exit status) instead of losing it to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def wait_exit(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """The exit status of `pid` (ours, or adopted as subreaper); None if it did not exit."""
    deadline = time.monotonic() + timeout
    if proc is not None:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not adopted (no subreaper): watch it go instead
            return None if psutil.pid_exists(pid) and not _zombie(pid) else -999
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- load --------------------------------------------------------------------------------------


class Tally:
    """Outcomes by (server, cause), thread-safe."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, server: str, outcome: str) -> None:
        with self._lock:
            self.counts[(server, outcome)] += 1

    def total(self, outcome: str | None = None, server: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (s, o), n in self.counts.items()
                if (outcome is None or o == outcome) and (server is None or s == server)
            )


def tcp_request(port: int, payload: bytes) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = s.makefile("rb").read()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "reset"  # reset before our shutdown(): by then the socket is closed
        return f"error {exc.__class__.__name__}"
    if reply == payload:
        return "ok"
    return "empty reply" if not reply else "wrong reply"


def udp_request(port: int, payload: bytes) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        try:
            s.sendto(payload, ("127.0.0.1", port))
            reply = s.recv(65536)
        except TimeoutError:
            return "udp lost"
        except OSError as exc:
            return f"error {exc.__class__.__name__}"
    return "ok" if reply == payload else "wrong reply"


def load_worker(ports: Ports, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    targets = [
        ("thread", ports.thread, 3),
        ("fork", ports.fork, 3),
        ("inline", ports.inline, 2),
        ("udp", ports.udp, 2),
        ("toggle", ports.toggle, 1),
    ]
    names = [t[0] for t in targets]
    port_of = {t[0]: t[1] for t in targets}
    weights = [t[2] for t in targets]
    n = 0
    while not stop.is_set():
        n += 1
        name = rng.choices(names, weights)[0]
        port = port_of[name]
        payload = f"{seed}:{n}:{'x' * rng.randint(0, 200)}\n".encode()
        outcome = udp_request(port, payload) if name == "udp" else tcp_request(port, payload)
        tally.add(name, outcome)
        if outcome == "refused":
            time.sleep(0.01)  # pacing while a server is stopped


def slow_client(port: int, trickle: bool, tally: Tally, stop: threading.Event) -> None:
    """Connect and send nothing (or a byte every 0.2 s, never a newline): is it cut off?"""
    kind = "slow (trickle)" if trickle else "slow (silent)"
    limit = SLOW_TIMEOUT + 2.0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
            s.settimeout(0.2)
            started = time.monotonic()
            while time.monotonic() - started < limit:
                if stop.is_set():
                    return  # the run ended first: no verdict
                try:
                    if not s.recv(100):
                        tally.add(kind, "cut off")
                        return
                except TimeoutError:
                    if trickle:
                        s.sendall(b"x")
            tally.add(kind, "outlived timeout")
    except OSError:
        tally.add(kind, "cut off")


# -- faults ------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="selectd-chaos-", dir="/tmp"))
        self.ports = Ports()
        self.config_path = self.workdir / "selectd.toml"
        self.log_path = self.workdir / "selectd.log"
        self.control = Control(str(self.workdir / "control.sock"))
        self.tally = Tally()
        self.faults: Counter[str] = Counter()
        self.samples: list[tuple[float, int, int, int]] = []  # (t, pid, rss, fds)
        self.exits: list[tuple[int, int | None]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.pids: list[int] = []
        self.extra = False
        self.thread_workers = 8
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.subreaper = become_subreaper()

    # -- the daemon's life -----------------------------------------------------------------

    def write_config(self) -> None:
        text = config_text(self.workdir, self.ports, self.extra, self.thread_workers)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)  # the daemon never reads half a file

    def start(self) -> None:
        (self.workdir / "chaoshandlers.py").write_text(HANDLERS)
        self.write_config()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(self.workdir)]))
        env.pop("SELECTD_CONFIG", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )
        self.pid = self.proc.pid
        self.pids.append(self.pid)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"selectd exited {self.proc.returncode} at start")
            with contextlib.suppress(OSError, ValueError):
                if self.control("ping").get("result") == "pong":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("selectd did not answer ping within 20 s")
            time.sleep(0.05)

    def shutdown(self) -> None:
        """SIGTERM the serving daemon and collect every exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        proc = self.proc if self.proc is not None and self.proc.pid == self.pid else None
        self.exits.append((self.pid, wait_exit(self.pid, proc, 30)))

    def cleanup(self) -> None:
        """Kill whatever is left of everything we started."""
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(10)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    # -- background activity ---------------------------------------------------------------

    def spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def sampler(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(0.5):
            pid = self.pid
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                with p.oneshot():
                    self.samples.append(
                        (time.monotonic() - started, pid, p.memory_info().rss, p.num_fds())
                    )

    def run(self) -> None:
        self.start()
        for i in range(self.args.clients):
            self.spawn(load_worker, self.ports, self.tally, self.stop, self.args.seed * 100 + i)
        self.spawn(self.sampler)
        started = time.monotonic()
        deadline = started + self.args.duration
        upgrade_at = None if self.args.no_upgrade else started + self.args.duration / 2
        while (now := time.monotonic()) < deadline:
            if upgrade_at is not None and now >= upgrade_at:
                upgrade_at = None
                self.upgrade()
            else:
                self.random_fault()
            self.stop.wait(min(self.rng.uniform(0.2, 0.8), max(0.0, deadline - now)))
        self.stop.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT + 5)
        self.shutdown()

    def random_fault(self) -> None:
        fault = self.rng.choice(
            ["kill_worker", "kill_worker", "reload", "toggle", "slow_client", "slow_client"]
        )
        getattr(self, fault)()

    def kill_worker(self) -> None:
        try:
            workers = self.control("status", server="fork")["result"]["servers"]["fork"]
        except (OSError, ValueError, KeyError):
            return
        # Only workers that have served: one killed young would count as a boot failure, and
        # five of those in a row (by design) mark the server failed.
        seasoned = [w["pid"] for w in workers.get("worker_processes", []) if w["requests"] > 0]
        if seasoned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(seasoned), signal.SIGKILL)
                self.faults["kill -9 fork worker"] += 1

    def reload(self) -> None:
        self.extra = not self.extra
        self.thread_workers = self.rng.choice([6, 8, 10])
        self.write_config()
        if self.rng.random() < 0.5:
            os.kill(self.pid, signal.SIGHUP)
            self.faults["SIGHUP reload"] += 1
        else:
            with contextlib.suppress(OSError, ValueError):
                self.control("reload")
            self.faults["reload command"] += 1

    def toggle(self) -> None:
        first, then = self.rng.choice([("stop", "start"), ("pause", "resume")])
        with contextlib.suppress(OSError, ValueError):
            self.control(first, server="toggle")
            self.stop.wait(self.rng.uniform(0.1, 0.4))
            for _ in range(50):  # a stopped server may still be draining: start when it can
                if self.control(then, server="toggle").get("ok"):
                    break
                time.sleep(0.02)
            self.faults[f"{first}/{then}"] += 1

    def slow_client(self) -> None:
        trickle = self.rng.random() < 0.5
        self.spawn(slow_client, self.ports.thread, trickle, self.tally, self.stop)
        self.faults["slow client (trickle)" if trickle else "slow client (silent)"] += 1

    def upgrade(self) -> None:
        old = self.pid
        os.kill(old, signal.SIGUSR2)
        self.faults["SIGUSR2 upgrade"] += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = self.control("status")["result"]["daemon"]["pid"]
                if pid != old:
                    self.pid = pid
                    self.pids.append(pid)
                    break
            time.sleep(0.05)
        else:
            return
        proc = self.proc if self.proc is not None and self.proc.pid == old else None
        self.exits.append((old, wait_exit(old, proc, 30)))

    # -- the verdict -----------------------------------------------------------------------

    def unexpected(self) -> list[str]:
        problems = []
        kills = self.faults["kill -9 fork worker"]
        for (server, outcome), n in sorted(self.tally.counts.items()):
            if outcome in ("ok", "cut off"):
                continue
            if server == "toggle" and outcome == "refused":
                continue  # stopped on purpose
            if server == "fork" and outcome in ("empty reply", "reset"):
                continue  # checked against the kills below
            if server == "udp" and outcome == "udp lost":
                continue  # checked against the allowance below
            problems.append(f"{server}: {n} x {outcome}")
        lost = self.tally.total("empty reply", "fork") + self.tally.total("reset", "fork")
        if lost > kills:
            problems.append(f"fork: {lost} requests lost for {kills} workers killed")
        udp_lost = self.tally.total("udp lost", "udp")
        if udp_lost > UDP_LOSS_ALLOWED * max(1, self.tally.total(None, "udp")):
            problems.append(f"udp: {udp_lost} datagrams lost (over {UDP_LOSS_ALLOWED:.0%})")
        for pid, code in self.exits:
            if code != 0:
                problems.append(f"daemon pid {pid} exited {code}")
        return problems

    def trend(self) -> dict[int, dict[str, float]]:
        """Per daemon process: median RSS (MiB) and fds in the first and last third."""
        out = {}
        for pid in dict.fromkeys(p for _t, p, _r, _f in self.samples):
            mine = [(r, f) for _t, p, r, f in self.samples if p == pid]
            if len(mine) < 3:
                continue
            third = len(mine) // 3
            first, last = mine[:third], mine[-third:]
            out[pid] = {
                "samples": len(mine),
                "rss_first_mib": statistics.median(r for r, _f in first) / 2**20,
                "rss_last_mib": statistics.median(r for r, _f in last) / 2**20,
                "fds_first": statistics.median(f for _r, f in first),
                "fds_last": statistics.median(f for _r, f in last),
            }
        return out

    def summary(self) -> dict[str, Any]:
        requests = sum(n for (s, _o), n in self.tally.counts.items() if not s.startswith("slow"))
        ok = sum(
            n for (s, o), n in self.tally.counts.items() if o == "ok" and not s.startswith("slow")
        )
        failures = {
            f"{s}: {o}": n
            for (s, o), n in sorted(self.tally.counts.items())
            if o != "ok" and not s.startswith("slow")
        }
        problems = self.unexpected()
        return {
            "duration": self.args.duration,
            "seed": self.args.seed,
            "requests": requests,
            "ok": ok,
            "failures": failures,
            "slow_clients": {
                f"{s}: {o}": n for (s, o), n in self.tally.counts.items() if s.startswith("slow")
            },
            "faults": dict(self.faults),
            "trend": self.trend(),
            "exits": [{"pid": p, "status": c} for p, c in self.exits],
            "unexpected": problems,
            "result": "FAIL" if problems else "PASS",
        }


def print_summary(s: dict[str, Any], log_path: Path | None) -> None:
    print(f"chaos summary ({s['duration']:.0f} s, seed {s['seed']})")
    print(f"requests: {s['requests']}, ok {s['ok']}, failed {s['requests'] - s['ok']}")
    print("failures by cause:" if s["failures"] else "failures by cause: none")
    for what, n in s["failures"].items():
        print(f"  {what}: {n}")
    print("slow clients: " + (", ".join(f"{k} {v}" for k, v in s["slow_clients"].items()) or "-"))
    print("faults: " + (", ".join(f"{k} {v}" for k, v in s["faults"].items()) or "none"))
    for pid, t in s["trend"].items():
        print(
            f"daemon pid {pid}: rss {t['rss_first_mib']:.1f} -> {t['rss_last_mib']:.1f} MiB, "
            f"fds {t['fds_first']:.0f} -> {t['fds_last']:.0f} "
            f"(medians of the first and last third of {t['samples']} samples)"
        )
    exits = ", ".join(f"{e['status']} (pid {e['pid']})" for e in s["exits"]) or "unknown"
    print(f"exit status: {exits}")
    for problem in s["unexpected"]:
        print(f"unexpected: {problem}")
    print(f"result: {s['result']}")
    if s["result"] != "PASS" and log_path is not None:
        print(f"daemon log: {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--clients", type=int, default=4, help="load threads")
    parser.add_argument("--no-upgrade", action="store_true", help="skip the SIGUSR2 upgrade")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    chaos = Chaos(args)
    keep_log = True
    try:
        chaos.run()
        result = chaos.summary()
        keep_log = result["result"] != "PASS"
        print_summary(result, chaos.log_path if keep_log else None)
        if args.json:
            print(json.dumps(result, default=str))
        return 0 if result["result"] == "PASS" else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        chaos.cleanup()
        if not keep_log:
            shutil.rmtree(chaos.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
