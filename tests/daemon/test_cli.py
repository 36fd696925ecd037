"""`selectd` as a command: exit statuses, messages, and never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, daemon_section, echo_roundtrip, wait_for


def selectd(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.pop("SELECTD_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


def test_check_ok_and_config_round_trips_through_check_stdin() -> None:
    assert selectd("check").stdout.strip() == "ok"
    dumped = selectd("config")
    assert dumped.returncode == 0
    assert "[servers.echo]" in dumped.stdout
    again = selectd("check", "-c", "-", stdin=dumped.stdout)
    assert (again.returncode, again.stdout.strip()) == (0, "ok"), again.stderr


def test_check_reports_each_problem_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[servers.echo]\nlisten = "127.0.0.1:7"\nhandler = "echo"\nworkers = "eight"\n'
        '[servers.x]\nlisten = "nowhere"\nhandler = "echo"\ntypo = 1\n'
    )
    result = selectd("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "servers.echo.workers: must be an integer >= 1, got 'eight'" in lines
    assert any(line.startswith("servers.x.listen:") for line in lines)
    assert any(line.startswith("servers.x.typo:") for line in lines)
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "text",
    [
        "[servers.a\nlisten=",  # TOML syntax error
        "\x00\xff binary",
        '[daemon]\nshutdown_timeout = "soon"\n',
        "[daemon]\nthread_cpu = -1\n",
    ],
)
def test_run_with_a_bad_config_exits_2_without_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, errors="surrogateescape")
    result = selectd("run", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip()
    assert "Traceback" not in result.stderr


def test_thread_cpu_this_process_may_not_run_on_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "cpu.toml"
    cpu = max(os.sched_getaffinity(0)) + 1  # a CPU number this machine does not let us use
    path.write_text(
        f'[daemon]\ncontrol_socket = "{tmp_path}/c.sock"\nthread_cpu = {cpu}\n'
        f'[servers.echo]\nlisten = "127.0.0.1:0"\nhandler = "echo"\n'
    )
    assert selectd("check", "-c", str(path)).returncode == 0  # a machine-independent config
    result = selectd("run", "-c", str(path))
    assert result.returncode == 2
    assert f"daemon.thread_cpu: CPU {cpu} is not one selectd may run on" in result.stderr
    assert "Traceback" not in result.stderr


def test_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nlog_level = "info"\nshutdown_timeout = = 3\n')
    result = selectd("check", "-c", str(path))
    assert result.returncode == 2
    assert "line 3" in result.stderr and "column" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = selectd("check", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2() -> None:
    result = selectd("check", "--no-such-flag")
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_bind_failure_exits_1_naming_server_and_address(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = tmp_path / "c.toml"
        path.write_text(
            daemon_section(tmp_path)
            + f'[servers.taken]\nlisten = "127.0.0.1:{port}"\nhandler = "echo"\n'
            + "allow_reuse_address = false\n"
        )
        result = selectd("run", "-c", str(path))
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"servers.taken to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_selectd_config_env_var_is_used(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[servers.only]\nlisten = "127.0.0.1:0"\nhandler = "time"\n')
    result = selectd("config", env={"SELECTD_CONFIG": str(path)})
    assert result.returncode == 0
    assert "[servers.only]" in result.stdout
    assert "[servers.echo]" not in result.stdout


def test_bare_selectd_runs_the_embedded_default(tmp_path: Path) -> None:
    default_ports = [7007, 7009, 7013, 7019, 7037]
    for port in default_ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} of the default config is in use here")
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("SELECTD_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: _answers(7007), 15)
        assert echo_roundtrip(7007, b"default\n") == b"default\n"
        with socket.create_connection(("127.0.0.1", 7037), timeout=5) as s:
            assert len(s.recv(10)) == 4  # RFC 868 time
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
