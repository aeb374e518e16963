"""Prometheus metrics of the client and the server: real processes, a real transfer through
the tunnel, a real HTTP scrape parsed by prometheus-client's own parser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.client.cli_process import (
    free_tcp_port,
    isolated_env,
    program,
    stop,
    wait_for_port,
    write_json,
)
from tests.client.proxy_helpers import CURL, Origin, require_curl, run_origin
from tests.client.tunnel_helpers import free_udp_port

pytestmark = pytest.mark.timeout(180)

TRANSFER = 3_000_000

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, path: str = "/metrics") -> tuple[Samples, dict[str, str]]:
    """GET the endpoint (no proxy) and parse it; returns samples and each family's type."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_for_metrics(port: int, process: subprocess.Popen[bytes], name: str) -> Samples:
    """Scrape until a sample of `name` exists (the daemon is up and its tunnel connected)."""
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "the process exited"
        try:
            samples, _ = scrape(port)
            if any(key[0] == name and v > 0 for key, v in samples.items()):
                return samples
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"no {name} > 0 in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def test_client_and_server_metrics_count_a_transfer(origin: Origin, tmp_path: Path) -> None:
    key = os.urandom(16).hex()
    udp_port = free_udp_port()
    server_metrics, client_metrics, proxy_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    server_config = write_json(
        tmp_path / "server.json",
        {
            "listen": f"127.0.0.1:{udp_port}",
            "access_keys": [{"name": "alice", "key": key}, "unused-key"],
            "metrics": {"listen": f"127.0.0.1:{server_metrics}"},
        },
    )
    client_config = write_json(
        tmp_path / "client.json",
        {
            "inbounds": [{"type": "local_proxy", "port": proxy_port}],
            "outbounds": [
                {"type": "ostp", "server": f"127.0.0.1:{udp_port}", "access_key": key},
                {"type": "direct"},
            ],
            "routing": {"rules": [{"domain": ["direct.test"], "outbound": "direct"}]},
            "metrics": {"listen": f"127.0.0.1:{client_metrics}"},
            "control": {"socket": ""},
        },
    )
    env = isolated_env(tmp_path)
    server = subprocess.Popen(
        [*program("ostp-server"), "run", "-c", str(server_config)],
        stderr=(tmp_path / "server.log").open("wb"),
        env=env,
    )
    client = subprocess.Popen(
        [*program(), "run", "-c", str(client_config)],
        stderr=(tmp_path / "client.log").open("wb"),
        env=env,
    )
    try:
        wait_for_port(proxy_port, client)
        before = wait_for_metrics(client_metrics, client, "ostp_client_session_up")
        server_before, _ = scrape(server_metrics)
        result = subprocess.run(
            [
                CURL,
                "-sS",
                "--fail",
                "-x",
                f"socks5h://127.0.0.1:{proxy_port}",
                origin.url(f"/bytes/{TRANSFER}"),
                "-o",
                os.devnull,
                "-w",
                "%{size_download}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0 and int(result.stdout) == TRANSFER, result.stderr
        # wait until the connection has ended in the daemon: its bytes now count as closed
        deadline = time.monotonic() + 20
        while True:
            after, types = scrape(client_metrics)
            if value(after, "ostp_client_connections") == 0:
                break
            assert time.monotonic() < deadline, "the connection did not end"
            time.sleep(0.05)
        server_after, server_types = scrape(server_metrics)
    finally:
        stop(client)
        stop(server)
    log = (tmp_path / "client.log").read_text() + (tmp_path / "server.log").read_text()

    def grew(samples_after: Samples, samples_before: Samples, name: str, **labels: str) -> float:
        old = samples_before.get((name, frozenset(labels.items())), 0.0)
        return value(samples_after, name, **labels) - old

    # client: payload bytes per outbound, datagram bytes per session, the rule that matched
    assert types["ostp_client_outbound_bytes"] == "counter"
    assert (
        grew(after, before, "ostp_client_outbound_bytes_total", outbound="proxy", direction="down")
        >= TRANSFER
    ), log
    assert (
        grew(
            after,
            before,
            "ostp_client_session_bytes_total",
            outbound="proxy",
            session="0",
            direction="down",
        )
        >= TRANSFER
    )
    assert value(after, "ostp_client_outbound_up", outbound="proxy") == 1
    assert value(after, "ostp_client_session_up", outbound="proxy", session="0") == 1
    assert 0 < value(after, "ostp_client_outbound_rtt_seconds", outbound="proxy") < 5
    assert value(after, "ostp_client_rule_hits_total", rule="default", outbound="proxy") >= 1
    assert value(after, "ostp_client_rule_hits_total", rule="0", outbound="direct") == 0
    assert value(after, "ostp_client_connections_closed_total") >= 1
    assert value(after, "ostp_client_inbound_accepted_total", inbound="proxy-in") >= 1
    assert (
        value(after, "ostp_client_session_datagrams_received_total", outbound="proxy", session="0")
        > TRANSFER / 65507  # none larger than UDP allows (on loopback they grow to ~64 KB)
    )
    assert (
        "ostp_client_session_retransmissions_total",
        frozenset({("outbound", "proxy"), ("session", "0"), ("reason", "nack")}),
    ) in after
    assert value(after, "ostp_client_outbound_reconnects_total", outbound="proxy") == 0
    assert value(after, "ostp_client_build_info", version="0.2.0.dev0") == 1
    # server: the same transfer, per key (by its name, never the key itself)
    assert server_types["ostp_server_key_bytes"] == "counter"
    assert (
        grew(
            server_after,
            server_before,
            "ostp_server_key_bytes_total",
            key="alice",
            direction="down",
        )
        >= TRANSFER
    )
    assert value(server_after, "ostp_server_key_sessions_total", key="alice") >= 1
    assert value(server_after, "ostp_server_key_active_sessions", key="alice") == 1
    assert value(server_after, "ostp_server_key_bytes_total", key="key#1", direction="up") == 0
    assert value(server_after, "ostp_server_sessions") == 1
    assert value(server_after, "ostp_server_dropped_datagrams_total", reason="unauthenticated") == 0
    text = json.dumps(sorted(map(str, server_after)))
    assert key not in text and "unused-key" not in text


def test_endpoint_answers_only_metrics_and_survives_bad_requests(tmp_path: Path) -> None:
    metrics_port, proxy_port = free_tcp_port(), free_tcp_port()
    config = write_json(
        tmp_path / "client.json",
        {
            "inbounds": [{"type": "local_proxy", "port": proxy_port}],
            "outbounds": [{"type": "direct"}],
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "control": {"socket": ""},
        },
    )
    client = subprocess.Popen(
        [*program(), "run", "-c", str(config)],
        stderr=subprocess.DEVNULL,
        env=isolated_env(tmp_path),
    )
    try:
        wait_for_port(metrics_port, client)
        for request, status in (
            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
            (b"garbage\r\n\r\n", b"400"),
            (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        ):
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
                sock.sendall(request)
                answer = sock.recv(100)
            assert answer.split(b" ")[1] == status, (request[:20], answer)
        # a scraper that connects and says nothing does not block the next one
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=10):
            samples, _ = scrape(metrics_port)
        assert value(samples, "ostp_client_connections") == 0
        openmetrics = urllib.request.Request(
            f"http://127.0.0.1:{metrics_port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(openmetrics, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.read().rstrip().endswith(b"# EOF")
        assert client.poll() is None
    finally:
        stop(client)
