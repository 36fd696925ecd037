"""Promise 6: no config, however wrong, crashes `check` or changes a running daemon.

`selectd check -c -` on generated configs (wrong types, huge and negative numbers, unicode, bad
CIDRs and listen strings, unknown keys) and on raw text exits 0 or 2, never with a traceback, and
every problem line it prints on 2 starts with the key path it is about. Reloading a running
daemon with a config that has at least one definite error changes nothing: the same servers, with
the same settings and the same fork workers, answering as before.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, Daemon, daemon_section, echo_roundtrip, free_port, wait_for
from tests.reliability.conftest import status

# -- generated configs -------------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = (
    st.booleans()
    | INT64
    | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24).filter(lambda s: ":" not in s)  # no "module:Class" to import
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
listens = st.sampled_from(
    [
        "127.0.0.1:0",
        "127.0.0.1:7007",
        "[::1]:0",
        "localhost:0",
        "unix:/tmp/selectd-fuzz.sock",
        "unix:@selectd-fuzz",
        "1.2.3.4",
        "127.0.0.1:99999",
        "127.0.0.1:-1",
        "[127.0.0.1]:80",
        "::1:80",
        "[::1]",
        "unix:relative.sock",
        "unix:@",
        "unix:/" + "x" * 200,
        "host.example:80",
        "",
        "127.0.0.1:\uff18\uff10",  # fullwidth digits
    ]
)
networks = st.sampled_from(
    [
        "10.0.0.0/8",
        "::1/128",
        "::ffff:127.0.0.0/104",
        "127.0.0.1",
        "300.0.0.0/8",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "::1/129",
        "fe80::/10%eth0",
        "",
        "not a network",
    ]
)
handlers = st.sampled_from(
    ["echo", "discard", "chargen", "daytime", "time", "nope", "", "no_such_module_xyz:Handler"]
)
server_keys = {
    "listen": listens | scalars,
    "handler": handlers | scalars,
    "socket_type": st.sampled_from(["stream", "dgram", "raw"]) | scalars,
    "concurrency": st.sampled_from(["inline", "thread", "fork", "exec"]) | scalars,
    "workers": INT64 | scalars,
    "max_queue": INT64 | scalars,
    "request_queue_size": INT64 | scalars,
    "timeout": st.floats(allow_nan=True) | INT64 | scalars,
    "allow": st.lists(networks, max_size=3) | scalars,
    "deny": st.lists(networks | scalars, max_size=3),
    "enabled": st.booleans() | scalars,
    "allow_reuse_port": st.booleans() | scalars,
    "options": st.dictionaries(st.text(max_size=8), values, max_size=3),
}
servers_tables = st.fixed_dictionaries(
    {}, optional={**server_keys, "unknown_key": values, "ünïcödé": values}
)
server_names = st.sampled_from(["echo", "a.b", "a b", "é", "", "x" * 100]) | st.text(max_size=10)
daemon_tables = st.fixed_dictionaries(
    {},
    optional={
        "control_socket": st.sampled_from(["/tmp/selectd-fuzz/c.sock", "relative.sock", ""])
        | scalars,
        "log_level": st.sampled_from(["debug", "info", "loud"]) | scalars,
        "log_format": st.sampled_from(["json", "console", "auto", "xml"]) | scalars,
        "shutdown_timeout": st.floats(allow_nan=True) | INT64 | scalars,
        "pidfile": st.sampled_from(["/tmp/selectd-fuzz.pid", "relative.pid"]) | scalars,
        "user": st.sampled_from(["root", "nobody", "no-such-user-xyz"]) | scalars,
        "bogus": values,
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "daemon": daemon_tables | scalars,
        "servers": st.dictionaries(server_names, servers_tables | scalars, max_size=3) | scalars,
        "extra": values,
    },
)


def run_check(text: bytes) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "check", "-c", "-"],
        input=text,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"},
        cwd=REPO,
        timeout=60,
    )
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    return done.returncode, output


@settings(max_examples=25, deadline=None, database=None)
@given(document=documents)
def test_check_never_crashes_and_names_the_key_path(document: dict[str, Any]) -> None:
    text = tomli_w.dumps(document).encode()
    code, output = run_check(text)
    assert "Traceback" not in output, output
    assert code in (0, 2), (code, output)
    if code == 0:
        assert output.strip() == "ok", output
        return
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "exit 2 with no message"
    for line in lines:
        path, message = split_problem(line)
        assert message, line
        # The path leads to the value the problem is about: every step of it is in the
        # document, but the last when that key is the one missing.
        steps = key_path(path)
        assert steps, f"{line!r} does not start with a key path"
        node: Any = document
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            found = _step(node, step)
            if found is _ABSENT:
                assert last and "missing" in message, f"{line!r}: no {step!r} in the document"
                break
            node = found


_ABSENT = object()
_STEP = re.compile(r'(?:([A-Za-z0-9_-]+)|("(?:[^"\\]|\\.)*"))((?:\[\d+\])*)')


def split_problem(line: str) -> tuple[str, str]:
    """A problem line's key path and message (the path's quoted keys may hold ': ')."""
    match = re.match(r'((?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\[\d+\]|\.)+): (.*)', line)
    return (match.group(1), match.group(2)) if match else ("", "")


def key_path(path: str) -> list[str | int]:
    """servers."b c".allow[0] -> ["servers", "b c", "allow", 0]; [] when it is not one."""
    steps: list[str | int] = []
    end = 0
    for i, part in enumerate(re.finditer(_STEP, path)):
        if part.start() != (end + 1 if i else 0) or (i and path[end] != "."):
            return []
        end = part.end()
        bare, quoted, indexes = part.groups()
        steps.append(bare if bare is not None else json.loads(quoted))
        steps += [int(n) for n in re.findall(r"\d+", indexes)]
    return steps if end == len(path) else []


def _step(node: Any, step: str | int) -> Any:
    if isinstance(step, int):
        return node[step] if isinstance(node, list) and step < len(node) else _ABSENT
    return node.get(step, _ABSENT) if isinstance(node, dict) else _ABSENT


RAW_TEXTS = {
    "syntax": b"[servers.a\nlisten = ",
    "binary": bytes(range(256)),
    "nul": b'[servers.a]\nlisten = "127.0.0.1:1\x00"\nhandler = "echo"\n',
    "bom": b'\xef\xbb\xbf[servers.a]\nlisten = "127.0.0.1:0"\nhandler = "echo"\n',
    "deep": b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "huge int": b'[servers.a]\nlisten = "127.0.0.1:0"\nhandler = "echo"\nworkers = '
    + b"9" * 5000
    + b"\n",
    "duplicate table": b'[servers.a]\nhandler = "echo"\n[servers.a]\nhandler = "echo"\n',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(RAW_TEXTS))
def test_check_on_raw_text_never_crashes(name: str) -> None:
    code, output = run_check(RAW_TEXTS[name])
    assert "Traceback" not in output, output
    assert code in (0, 2), (code, output)
    if code == 2:
        assert all(": " in line for line in output.splitlines() if line.strip()), output


# -- reload on a running daemon ------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(module_launch: Callable[..., Daemon]) -> Daemon:
    echo_port, fork_port, udp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    base = {
        "servers": {
            "echo": {"listen": f"127.0.0.1:{echo_port}", "handler": "echo", "workers": 4},
            "forked": {
                "listen": f"127.0.0.1:{fork_port}",
                "handler": "echo",
                "concurrency": "fork",
                "workers": 2,
            },
            "udp": {"listen": f"127.0.0.1:{udp_port}", "handler": "echo", "socket_type": "dgram"},
        }
    }
    daemon = module_launch(daemon_section("{dir}", log_level="info") + tomli_w.dumps(base))  # type: ignore[arg-type]
    daemon.base = base  # type: ignore[attr-defined]
    daemon.ports = {"echo": echo_port, "forked": fork_port, "udp": udp_port}  # type: ignore[attr-defined]
    return daemon


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """The servers' settings and identity as the daemon reports them."""
    servers = status(daemon)["servers"]
    fields = ("state", "listen", "address", "socket_type", "concurrency", "workers")
    shot = {name: {f: figures[f] for f in fields} for name, figures in servers.items()}
    for name, figures in servers.items():
        if "worker_processes" in figures:
            shot[name]["worker_pids"] = sorted(w["pid"] for w in figures["worker_processes"])
    reply = daemon.control("config")
    assert reply["ok"], reply
    shot["config"] = reply["result"]
    return shot


def definite_errors(ports: dict[str, int]) -> st.SearchStrategy[tuple[str, Callable[..., Any]]]:
    """(what, mutate(document)): a change that makes any config invalid."""

    def at(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
        def mutate(doc: dict[str, Any]) -> None:
            table = doc
            for key in path[:-1]:
                table = table.setdefault(key, {})
            table[path[-1]] = value

        return mutate

    bad_workers = st.integers(max_value=0) | st.integers(min_value=10**7, max_value=2**63 - 1)
    unknown = st.text(min_size=1, max_size=10).filter(
        lambda k: (
            k not in {"control_socket", "log_level", "log_format", "shutdown_timeout"}
            and k not in {"pidfile", "user", "group", "metrics_listen"}
        )
    )
    return st.one_of(
        bad_workers.map(lambda n: ("workers", at(("servers", "echo", "workers"), n))),
        st.text(max_size=10).map(lambda s: ("workers type", at(("servers", "echo", "workers"), s))),
        listens.filter(lambda s: not re.fullmatch(r"(127\.0\.0\.1|\[::1\]|localhost):[0-9]+", s))
        .filter(lambda s: not s.startswith("unix:/tmp") and s != "unix:@selectd-fuzz")
        .map(lambda s: ("listen", at(("servers", "echo", "listen"), s))),
        st.sampled_from(["300.0.0.0/8", "10.0.0.1/8", "::1/129", "x"]).map(
            lambda n: ("cidr", at(("servers", "forked", "deny"), [n]))
        ),
        unknown.map(lambda k: ("unknown daemon key", at(("daemon", k), 1))),
        st.just(("unknown top-level key", at(("surprise",), {"a": 1}))),
        st.just(("missing handler", at(("servers", "new"), {"listen": "127.0.0.1:0"}))),
        st.just(("bad handler", at(("servers", "echo", "handler"), "no_such_module_xyz:H"))),
        st.just(("timeout on dgram", at(("servers", "udp", "timeout"), 5))),
        st.just(("fork on dgram", at(("servers", "udp", "concurrency"), "fork"))),
        st.just(("bad name", at(("servers", "bad name"), {"listen": "127.0.0.1:0"}))),
        st.just(
            (
                "duplicate listen",
                at(
                    ("servers", "dup"),
                    {"listen": f"127.0.0.1:{ports['echo']}", "handler": "echo"},
                ),
            )
        ),
        st.floats(allow_nan=True)
        .filter(lambda x: math.isnan(x) or x <= 0)
        .map(lambda x: ("shutdown_timeout", at(("daemon", "shutdown_timeout"), x))),
    )


def test_invalid_reloads_change_nothing(running: Daemon) -> None:
    ports = {**running.ports, "spare": free_port()}  # type: ignore[attr-defined]
    base: dict[str, Any] = {
        **tomllib.loads(daemon_section(running.dir, log_level="info")),
        **running.base,  # type: ignore[attr-defined]
    }
    before = snapshot(running)
    refused_signals = 0
    tried: list[str] = []

    @settings(max_examples=25, deadline=None, database=None)
    @given(error=definite_errors(ports), add=st.booleans(), resize=st.booleans(), hup=st.booleans())
    def example(error: tuple[str, Callable[..., Any]], add: bool, resize: bool, hup: bool) -> None:
        nonlocal refused_signals
        what, mutate = error
        tried.append(what)
        doc = json.loads(json.dumps(base))
        if add:  # valid changes riding along: they must not be applied either
            doc["servers"]["added"] = {"listen": f"127.0.0.1:{ports['spare']}", "handler": "echo"}
        if resize:
            doc["servers"]["echo"]["workers"] = 7
        mutate(doc)
        running.config_path.write_text(tomli_w.dumps(doc))
        if hup:
            running.send(signal.SIGHUP)
            refused_signals += 1
            wait_for(lambda: len(running.find("reload_failed")) >= refused_signals)
            error_text = running.find("reload_failed")[-1]["error"]
        else:
            reply = running.control("reload")
            assert reply["ok"] is False, (what, reply)
            error_text = reply["error"]
        # "reload refused, nothing changed: servers.echo.workers: must be ...; ..."
        refused = r"reload refused, nothing changed: (daemon|servers|surprise)\b"
        assert re.match(refused, error_text), error_text
        assert snapshot(running) == before, what
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports["spare"]), timeout=2).close()
        assert echo_roundtrip(ports["echo"], b"unchanged\n") == b"unchanged\n"
        assert echo_roundtrip(ports["forked"], b"unchanged\n") == b"unchanged\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"unchanged", ("127.0.0.1", ports["udp"]))
            assert s.recvfrom(100)[0] == b"unchanged"

    try:
        example()
    finally:
        running.config_path.write_text(tomli_w.dumps(base))
    print(f"{len(tried)} invalid reloads refused ({refused_signals} by SIGHUP): {set(tried)}")
    assert len(tried) >= 20
    assert running.control("reload")["ok"], "the original config reloads cleanly"
    assert snapshot(running) == before
