"""[daemon] metrics_listen: Prometheus scrapes GET /metrics over HTTP from the same loop."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import daemon_section, echo_roundtrip, free_port, wait_for


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_metrics_and_healthz_over_http(start_daemon, tmp_path: Path) -> None:
    metrics_port = free_port()
    echo_port = free_port()
    config = daemon_section(tmp_path, metrics_listen=f"127.0.0.1:{metrics_port}")
    config += f'[servers.echo]\nlisten = "127.0.0.1:{echo_port}"\nhandler = "echo"\n'
    daemon = start_daemon(config)
    for _ in range(3):
        assert echo_roundtrip(echo_port) == b"hello\n"

    def scrape() -> dict:
        status, headers, body = get(metrics_port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    def durations_counted() -> dict | None:
        # A request is accounted just after its connection closes: wait for the third.
        families = scrape()
        histogram = families["selectd_request_duration_seconds"]
        count = [s for s in histogram.samples if s.name.endswith("_count")]
        return families if count[0].value == 3.0 else None

    families = wait_for(durations_counted, 5)
    requests = families["selectd_requests"].samples
    assert [(s.labels, s.value) for s in requests] == [({"server": "echo"}, 3.0)]
    assert {"selectd_active_requests", "selectd_queued_requests"} <= set(families)

    assert get(metrics_port, "/healthz")[:1] == (200,)
    assert get(metrics_port, "/nope")[0] == 404
    assert get(metrics_port, "/metrics", method="POST")[0] == 405
    head = get(metrics_port, "/metrics", method="HEAD")
    assert head[0] == 200 and head[2] == b""

    # A scraper that connects and stalls costs only its own connection.
    stalled = socket.create_connection(("127.0.0.1", metrics_port))
    stalled.sendall(b"GET /metr")
    started = time.monotonic()
    assert get(metrics_port, "/healthz")[0] == 200
    assert time.monotonic() - started < 2
    stalled.close()

    # Garbage gets a 400, and the endpoint carries on.
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as s:
        s.sendall(b"\x00\xffnonsense\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert get(metrics_port, "/metrics")[0] == 200
    assert daemon.stop(signal.SIGTERM) == 0


def test_metrics_listen_that_cannot_bind_is_a_startup_error(start_daemon, tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        daemon = start_daemon(
            daemon_section(tmp_path, metrics_listen=f"127.0.0.1:{port}"), ready=False
        )
        assert daemon.proc.wait(15) == 1
        assert f"daemon.metrics_listen to 127.0.0.1:{port}" in daemon.log_text()
    finally:
        holder.close()
