"""End to end through the tunnel: real curl → ostp-client → real ostp-server → local origin."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_client.outbounds.ostp import OstpOutbound
from tests.client.origin_server import body_sha256
from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
    wait_for,
)
from tests.client.tunnel_helpers import LossyRelay, ServerProcess, ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

MB = 1024 * 1024
MODES = ["socks5h", "socks5", "http", "connect"]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path) as running:
        yield running


def tunnel_config(outbound: dict[str, Any], **routing: Any) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            outbound,
            # the origin sees 127.0.0.3 for direct traffic and 127.0.0.1 for the server's
            {"type": "direct", "tag": "direct", "bind_address": "127.0.0.3"},
            {"type": "block", "tag": "block"},
        ],
        "routing": {"rules": routing.get("rules", []), "default_outbound": "proxy"},
    }


def _host(mode: str) -> str:
    return "localhost" if mode == "socks5h" else "127.0.0.1"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def _ostp(daemon: Any) -> OstpOutbound:
    outbound = daemon.outbounds["proxy"]
    assert isinstance(outbound, OstpOutbound)
    return outbound


async def _connected(daemon: Any, limit: float = 15) -> None:
    await wait_for(lambda: _ostp(daemon).state == "connected", limit)


def _attempted_again(daemon: Any) -> Callable[[], bool]:
    """A condition: the outbound has started another connection attempt since now."""
    attempts = _ostp(daemon).status().reconnects
    return lambda: _ostp(daemon).status().reconnects > attempts


async def _download(port: int, origin: Origin, mode: str, size: int, out: Path) -> None:
    url = origin.url(f"/bytes/{size}", host=_host(mode))
    result = await curl([*proxy_args(mode, port), "-o", str(out), url], time_limit=150)
    assert result.returncode == 0, result.stderr
    assert (await anyio.Path(out).stat()).st_size == size
    assert await anyio.to_thread.run_sync(_file_sha256, out) == body_sha256(size)


async def _upload(port: int, origin: Origin, mode: str, data: bytes, tmp: Path) -> None:
    upload = tmp / "upload"
    upload.write_bytes(data)
    url = origin.url("/upload", host=_host(mode))
    result = await curl(
        [*proxy_args(mode, port), "--data-binary", f"@{upload}", url], time_limit=150
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.parametrize("mode", MODES)
async def test_50mb_down_and_20mb_up_byte_exact(
    origin: Origin, server: ServerProcess, mode: str, tmp_path: Path
) -> None:
    async with running_daemon(tunnel_config(server.outbound())) as daemon:
        await _connected(daemon)
        port = proxy_port(daemon)
        await _download(port, origin, mode, 50 * MB, tmp_path / "body")
        await _upload(port, origin, mode, os.urandom(20 * MB), tmp_path)
        assert _ostp(daemon).status().bytes_down > 50 * MB


async def test_on_loopback_datagrams_climb_to_64_kb(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    """Path MTU discovery starts at 1,232 bytes and, on loopback (MTU 65536), probes its way up
    to the ceiling, so loopback transfers keep their large datagrams."""
    async with running_daemon(tunnel_config(server.outbound())) as daemon:
        await _connected(daemon)
        session = _ostp(daemon).sessions[0]
        await wait_for(lambda: (session.snapshot().datagram_size or 0) >= 60_000, 15)
        assert session.snapshot().pmtud == "search_complete"
        await _download(proxy_port(daemon), origin, "socks5", 20 * MB, tmp_path / "body")
        assert session.conn is not None and session.conn.datagram_size >= 60_000


async def test_200_transfers_at_once(origin: Origin, server: ServerProcess) -> None:
    count = 200
    args = ["--parallel", "--parallel-max", str(count), "-w", "%{http_code} %{size_download}\n"]
    for index in range(count):
        args += ["-o", "/dev/null", origin.url(f"/bytes/{20000 + index}")]
    config = tunnel_config(server.outbound(mux={"enabled": True, "sessions": 2}))
    async with running_daemon(config) as daemon:
        await wait_for(
            lambda: all(s.state == "connected" for s in _ostp(daemon).sessions), time_limit=15
        )
        result = await curl([*proxy_args("socks5h", proxy_port(daemon)), *args], time_limit=120)
        assert result.returncode == 0, result.stderr
        lines = sorted(result.stdout.split("\n")[:-1])
        assert lines == sorted(f"200 {20000 + i}" for i in range(count))
        sessions = _ostp(daemon).status().sessions
        assert all(s.state == "connected" for s in sessions) and len(sessions) == 2


async def test_routing_decides_tunnel_direct_or_block(
    origin: Origin, server: ServerProcess
) -> None:
    rules = [
        {"domain": ["localhost"], "outbound": "direct"},
        {"domain": ["blocked.test"], "outbound": "block"},
    ]
    async with running_daemon(tunnel_config(server.outbound(), rules=rules)) as daemon:
        await _connected(daemon)
        port = proxy_port(daemon)
        origin.clear()
        for host in ("127.0.0.1", "localhost"):
            result = await curl([*proxy_args("socks5h", port), origin.url("/whoami", host=host)])
            assert result.returncode == 0, result.stderr
        blocked = await curl([*proxy_args("socks5h", port), f"http://blocked.test:{origin.port}/"])
        assert blocked.returncode == 97  # curl: the SOCKS5 server refused (reply 0x02)
    seen = {entry["host"].rsplit(":", 1)[0]: entry["client"] for entry in origin.log()}
    assert seen["127.0.0.1"] == "127.0.0.1"  # through the tunnel: the server connected
    assert seen["localhost"] == "127.0.0.3"  # direct, from its bound address
    assert "blocked.test" not in seen


async def test_reconnects_after_the_server_returns(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    outbound = server.outbound(idle_timeout=2, keepalive_interval=0.5)
    async with running_daemon(tunnel_config(outbound)) as daemon:
        await _connected(daemon)
        port = proxy_port(daemon)
        for _ in range(3):
            server.stop()
            await wait_for(lambda: _ostp(daemon).state == "connecting", 20)
            # the server stays away until the client has begun a new attempt without it
            await wait_for(_attempted_again(daemon), 30)
            await anyio.to_thread.run_sync(server.start)
            await _connected(daemon, limit=30)
            await _download(port, origin, "socks5h", 2 * MB, tmp_path / "after")
        assert _ostp(daemon).status().reconnects >= 3


@pytest.mark.parametrize("loss", [0.02, 0.10])
async def test_20mb_byte_exact_through_a_lossy_path(
    origin: Origin, server: ServerProcess, loss: float, tmp_path: Path
) -> None:
    with LossyRelay(server.port, loss) as relay:
        async with running_daemon(tunnel_config(server.outbound(relay.port))) as daemon:
            await _connected(daemon, limit=30)
            port = proxy_port(daemon)
            await _download(port, origin, "socks5h", 20 * MB, tmp_path / "body")
            await _upload(port, origin, "socks5h", os.urandom(5 * MB), tmp_path)
        assert relay.dropped > 0


async def test_duplication_and_reordering_with_loss(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    with LossyRelay(server.port, 0.03, duplicate=0.01, reorder=0.05) as relay:
        async with running_daemon(tunnel_config(server.outbound(relay.port))) as daemon:
            await _connected(daemon, limit=30)
            await _download(proxy_port(daemon), origin, "socks5h", 20 * MB, tmp_path / "body")
        assert relay.dropped > 0 and relay.duplicated > 0 and relay.reordered > 0


async def _udp_echo(sock: anyio.abc.UDPSocket) -> None:
    async for data, (host, port) in sock:
        await sock.sendto(b"echo:" + data, host, port)


async def test_socks5_udp_associate_through_the_tunnel(server: ServerProcess) -> None:
    from ostp_client.flow import Address
    from ostp_client.inbounds.proxy.socks5 import encode_udp_packet, parse_udp_packet
    from tests.client.test_socks5 import _parse_reply_address, _socks_request

    async with (
        await anyio.create_udp_socket(local_host="127.0.0.1") as echo,
        anyio.create_task_group() as tg,
        running_daemon(tunnel_config(server.outbound())) as daemon,
    ):
        tg.start_soon(_udp_echo, echo)
        await _connected(daemon)
        echo_addr = Address("127.0.0.1", echo.extra(anyio.abc.SocketAttribute.local_port))
        control, reply = await _socks_request(proxy_port(daemon), b"\x05\x03\x00\x01" + bytes(6))
        relay = _parse_reply_address(reply)
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as client:
            got = []
            with anyio.fail_after(15):
                for word in (b"one", b"two", b"three"):
                    await client.sendto(encode_udp_packet(echo_addr, word), relay.host, relay.port)
                    data, _ = await client.receive()
                    got.append(parse_udp_packet(data))
        assert [(p.target, p.payload) for p in got] == [
            (echo_addr, b"echo:one"),
            (echo_addr, b"echo:two"),
            (echo_addr, b"echo:three"),
        ]
        await control.aclose()
        tg.cancel_scope.cancel()


async def test_two_ostp_outbounds_to_different_servers_at_once(
    origin: Origin, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ostp_server(tmp_path / "a") as first, ostp_server(tmp_path / "b") as second:
        config = tunnel_config(first.outbound(), rules=[{"domain": ["localhost"], "outbound": "b"}])
        config["outbounds"].append({**second.outbound(), "tag": "b"})
        async with running_daemon(config) as daemon:
            a, b = daemon.outbounds["proxy"], daemon.outbounds["b"]
            assert isinstance(a, OstpOutbound) and isinstance(b, OstpOutbound)
            await wait_for(lambda: a.state == b.state == "connected", 15)
            port = proxy_port(daemon)
            # socks5 sends the IP (default route: "proxy"), socks5h the name "localhost" ("b")
            await _download(port, origin, "socks5", 3 * MB, tmp_path / "via-a")
            await _download(port, origin, "socks5h", 5 * MB, tmp_path / "via-b")
            assert 3 * MB < a.status().bytes_down < 5 * MB
            assert b.status().bytes_down > 5 * MB
            assert {a.server, b.server} == {("127.0.0.1", first.port), ("127.0.0.1", second.port)}


async def test_a_slow_reader_keeps_the_client_buffer_bounded(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    async with running_daemon(tunnel_config(server.outbound())) as daemon:
        await _connected(daemon)
        outbound = _ostp(daemon)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, *(s.buffered for s in outbound.sessions))
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            url = origin.url(f"/bytes/{24 * MB}")
            args = [*proxy_args("socks5h", proxy_port(daemon)), "--limit-rate", "4M"]
            result = await curl([*args, "-o", str(tmp_path / "slow"), url], time_limit=60)
            tg.cancel_scope.cancel()
        assert result.returncode == 0, result.stderr
        assert await anyio.to_thread.run_sync(_file_sha256, tmp_path / "slow") == body_sha256(
            24 * MB
        )
        # The server sends the stream no more than its window (flow control), which grows
        # only while the reader drains it fast: the buffer never follows the body's size.
        # (Stopped readers, and servers without flow control: test_tunnel_flow.py.)
        assert peak < 16 * MB
