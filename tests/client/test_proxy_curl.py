"""End to end: real curl through the local proxy (SOCKS5 and HTTP on one port) to a real origin."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.client.origin_server import body_sha256
from tests.client.proxy_helpers import (
    Origin,
    base_config,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

MODES = ["socks5h", "socks5", "http", "connect"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def _host(mode: str) -> str:
    return "localhost" if mode == "socks5h" else "127.0.0.1"


@pytest.mark.parametrize("mode", MODES)
async def test_download_50mb_byte_exact(origin: Origin, mode: str, tmp_path: Path) -> None:
    size = 50 * MB
    out = tmp_path / "body"
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        url = origin.url(f"/bytes/{size}", host=_host(mode))
        result = await curl([*proxy_args(mode, port), "-o", str(out), url])
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size == size
        assert await anyio.to_thread.run_sync(_file_sha256, out) == body_sha256(size)
        snapshot_ok = daemon.registry.closed_bytes_down >= size or any(
            c.bytes_down >= size for c in daemon.registry.live.values()
        )
        assert snapshot_ok


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_upload_20mb_byte_exact(
    origin: Origin, mode: str, chunked: bool, tmp_path: Path
) -> None:
    data = os.urandom(20 * MB)
    upload = tmp_path / "upload"
    upload.write_bytes(data)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        url = origin.url("/upload", host=_host(mode))
        result = await curl([*proxy_args(mode, port), *extra, "--data-binary", f"@{upload}", url])
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("mode", ["socks5h", "http", "connect"])
async def test_200_transfers_at_once(origin: Origin, mode: str) -> None:
    count = 200
    args: list[str] = [
        "--parallel",
        "--parallel-max",
        str(count),
        "-w",
        "%{http_code} %{size_download}\n",
    ]
    for index in range(count):
        args += ["-o", "/dev/null", origin.url(f"/bytes/{20000 + index}", host=_host(mode))]
    async with running_daemon(base_config()) as daemon:
        result = await curl([*proxy_args(mode, proxy_port(daemon)), *args])
        served = daemon.registry.closed_total + len(daemon.registry.live)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.split("\n")[:-1])
    assert lines == sorted(f"200 {20000 + i}" for i in range(count))
    assert served >= 2  # curl opened several proxy connections in parallel


async def test_block_refuses_socks5_and_http(origin: Origin) -> None:
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        socks = await curl([*proxy_args("socks5h", port), "http://www.blocked.test/"])
        http = await curl(
            [
                *proxy_args("http", port),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://blocked.test/x",
            ]
        )
        connect = await curl(
            [*proxy_args("connect", port), "-o", "/dev/null", "http://blocked.test/x"]
        )
        assert daemon.router.rule_hits == [3]
    assert socks.returncode == 97  # CURLE_PROXY: the SOCKS5 reply said no
    assert "(2)" in socks.stderr  # reply 0x02: connection not allowed by ruleset
    assert http.stdout == "403"
    assert connect.returncode != 0
    assert "403" in connect.stderr
    assert origin.log() == [] or all("blocked" not in (e["host"] or "") for e in origin.log())


async def test_http_keep_alive_several_requests_and_hosts(origin: Origin) -> None:
    urls = [
        origin.url("/whoami"),
        origin.url("/bytes/1000"),
        origin.url("/whoami", host="localhost"),
        origin.url("/bytes/5"),
    ]
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        inbound = daemon.inbounds["proxy-in"]
        result = await curl(
            [*proxy_args("http", port), "-w", "\n%{http_code} %{num_connects}\n", *urls]
        )
        accepted = inbound.status().accepted
    assert result.returncode == 0, result.stderr
    codes = [line for line in result.stdout.split("\n") if line.startswith("200 ")]
    assert len(codes) == 4
    assert accepted == 1  # all four requests on one client connection


async def test_hop_by_hop_and_proxy_headers_removed(origin: Origin) -> None:
    config = base_config(users=[{"username": "u", "password": "p"}])
    async with running_daemon(config) as daemon:
        port = proxy_port(daemon)
        result = await curl(
            [
                *proxy_args("http", port, "u:p"),
                "-H",
                "Connection: keep-alive, X-Drop-Me",
                "-H",
                "X-Drop-Me: 1",
                "-H",
                "Keep-Alive: timeout=5",
                "-H",
                "Proxy-Foo: bar",
                "-H",
                "X-Keep: yes",
                origin.url("/whoami"),
            ]
        )
    assert result.returncode == 0, result.stderr
    headers = json.loads(result.stdout)["headers"]
    assert headers["x-keep"] == "yes"
    for name in ("x-drop-me", "keep-alive", "proxy-foo", "proxy-authorization", "proxy-connection"):
        assert name not in headers
    assert "connection" not in headers or "x-drop-me" not in headers["connection"].lower()


@pytest.mark.parametrize("mode", MODES)
async def test_authentication(origin: Origin, mode: str) -> None:
    config = base_config(users=[{"username": "alice", "password": "s3cret"}])
    url = origin.url("/whoami", host=_host(mode))
    async with running_daemon(config) as daemon:
        port = proxy_port(daemon)
        good = await curl([*proxy_args(mode, port, "alice:s3cret"), url])
        wrong = await curl([*proxy_args(mode, port, "alice:nope"), "-w", "%{http_code}", url])
        missing = await curl([*proxy_args(mode, port), "-w", "%{http_code}", url])
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["client"] == "127.0.0.1"
    for failed in (wrong, missing):
        if mode == "http":
            assert failed.stdout.endswith("407")
        else:
            assert failed.returncode != 0


async def test_http_407_carries_proxy_authenticate(origin: Origin) -> None:
    config = base_config(users=[{"username": "alice", "password": "s3cret"}])
    async with running_daemon(config) as daemon:
        result = await curl([*proxy_args("http", proxy_port(daemon)), "-i", origin.url("/whoami")])
    assert result.stdout.startswith("HTTP/1.1 407")
    assert 'proxy-authenticate: Basic realm="ostp-client"' in result.stdout.lower().replace(
        "basic", "Basic"
    )


async def test_http_errors_are_http_responses(origin: Origin) -> None:
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        refused = await curl(
            [
                *proxy_args("http", port),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:1/",
            ]
        )
        https = await curl(
            [
                "-x",
                f"http://127.0.0.1:{port}",
                "--proxy-insecure",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--request-target",
                "https://127.0.0.1/",
                origin.url("/"),
            ]
        )
        origin_form = await curl(
            ["-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/just/a/path"]
        )
    assert refused.stdout == "502"
    assert https.stdout == "400"
    assert origin_form.stdout == "400"


async def test_head_and_methods(origin: Origin) -> None:
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        head = await curl([*proxy_args("http", port), "-I", origin.url("/bytes/12345")])
        put = await curl(
            [
                *proxy_args("http", port),
                "-X",
                "PUT",
                "--data-binary",
                "hello",
                origin.url("/upload"),
            ]
        )
    assert head.returncode == 0, head.stderr
    assert "content-length: 12345" in head.stdout.lower()
    assert json.loads(put.stdout)["length"] == 5
