"""Connections the application ends first leave nothing behind (live entries, fds, CLOSE-WAIT).

For every outbound (ostp through a real ostp-server, direct, block) and every local-proxy way in
(SOCKS5 CONNECT, HTTP CONNECT, plain HTTP forwarding, the control connection of a SOCKS5 UDP
ASSOCIATE), a client that closes with FIN (real curl, which closes once it has the whole body)
and one that aborts with RST mid-transfer: afterwards the daemon (in this process) has no live
connection, no socket in CLOSE-WAIT and no more descriptors than before. The TUN inbound's
flows are covered in `test_tun_reliability.py`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_client.daemon import Daemon
from ostp_client.flow import Address
from ostp_client.inbounds.proxy.socks5 import encode_address, encode_udp_packet, parse_udp_packet
from ostp_client.outbounds.ostp import OstpOutbound
from tests.client.leak_helpers import close_wait_sockets, fd_count, settle
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
from tests.client.tunnel_helpers import ServerProcess, ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

OUTBOUNDS = ["ostp", "direct", "block"]
MODES = ["socks5h", "connect", "http"]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path_factory.mktemp("ostp-server")) as running:
        yield running


def leak_config(kind: str, server: ServerProcess) -> dict[str, Any]:
    outbounds: list[dict[str, Any]] = [
        {"type": "direct", "tag": "direct"},
        {"type": "block", "tag": "block"},
    ]
    if kind == "ostp":
        outbounds.insert(0, server.outbound())  # tag "proxy"
    default = {"ostp": "proxy", "direct": "direct", "block": "block"}[kind]
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": outbounds,
        "routing": {"rules": [], "default_outbound": default},
    }


@asynccontextmanager
async def leak_checked(kind: str, server: ServerProcess) -> AsyncIterator[Daemon]:
    """A daemon; on leaving, asserts that what the block did left nothing behind."""
    async with running_daemon(leak_config(kind, server)) as daemon:
        if kind == "ostp":
            outbound = daemon.outbounds["proxy"]
            assert isinstance(outbound, OstpOutbound)
            await wait_for(lambda: outbound.state == "connected", 15)
        baseline = fd_count()
        yield daemon
        registry = daemon.registry
        clean = await settle(
            lambda: not registry.live and fd_count() <= baseline and not close_wait_sockets()
        )
        assert clean, (
            f"live {registry.snapshot()}, fds {fd_count()} (baseline {baseline}),"
            f" CLOSE-WAIT {close_wait_sockets()}"
        )
        assert registry.closed_total > 0


def _host(mode: str) -> str:
    return "localhost" if mode == "socks5h" else "127.0.0.1"


async def _curl_many(port: int, origin: Origin, mode: str, count: int, kind: str) -> None:
    for index in range(count):
        url = origin.url(f"/bytes/{1000 + index}", host=_host(mode))
        result = await curl([*proxy_args(mode, port), "-o", "/dev/null", "-w", "%{http_code}", url])
        if kind == "block":
            assert result.returncode != 0 or result.stdout == "403", result
        else:
            assert (result.returncode, result.stdout) == (0, "200"), result.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", OUTBOUNDS)
async def test_clients_that_close_first_leave_nothing(
    origin: Origin, server: ServerProcess, kind: str, mode: str
) -> None:
    async with leak_checked(kind, server) as daemon:
        await _curl_many(proxy_port(daemon), origin, mode, 10, kind)


async def test_300_curl_requests_through_the_tunnel_leave_nothing(
    origin: Origin, server: ServerProcess
) -> None:
    # the report: `curl -x socks5h://...` 300 times left 300 live connections in CLOSE-WAIT
    async with leak_checked("ostp", server) as daemon:
        await _curl_many(proxy_port(daemon), origin, "socks5h", 300, "ostp")
        assert daemon.registry.closed_total >= 299


# --------------------------------------------------------------------------------------------
# clients that reset mid-transfer


def _abort(stream: anyio.abc.SocketStream) -> None:
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    return data


async def _socks_connect(port: int, target: Address) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05\x01\x00\x05\x01\x00" + encode_address(target))
    reply = b""
    while len(reply) < 2 + 4:
        reply += await stream.receive()
    assert reply[:4] == b"\x05\x00\x05\x00", reply
    while len(reply) < 2 + 10:  # an IPv4 bind address in the reply
        reply += await stream.receive()
    return stream


async def _open_transfer(port: int, origin: Origin, mode: str, path: str) -> anyio.abc.SocketStream:
    """A connection through the proxy on which the origin is sending ``path``."""
    target = Address("127.0.0.1", origin.port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    if mode == "http":
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(request.replace(b"GET ", f"GET {origin.url('')}".encode(), 1))
        return stream
    if mode == "connect":
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await _read_head(stream)
        assert head.startswith(b"HTTP/1.1 200"), head
    else:
        stream = await _socks_connect(port, target)
    await stream.send(request)
    return stream


@pytest.mark.parametrize("mode", ["socks5", "connect", "http"])
@pytest.mark.parametrize("kind", ["ostp", "direct"])
async def test_clients_that_reset_mid_transfer_leave_nothing(
    origin: Origin, server: ServerProcess, kind: str, mode: str
) -> None:
    async with leak_checked(kind, server) as daemon:
        port = proxy_port(daemon)
        for path in ("/forever", "/bytes/50000000"):
            for _ in range(3):
                stream = await _open_transfer(port, origin, mode, path)
                received = 0
                with anyio.fail_after(20):
                    while received < 256 * 1024:
                        received += len(await stream.receive())
                _abort(stream)
                await stream.aclose()


async def test_clients_that_close_before_the_answer_leave_nothing(
    origin: Origin, server: ServerProcess
) -> None:
    # FIN right after the request, before any of the answer (a client that gave up)
    async with leak_checked("ostp", server) as daemon:
        port = proxy_port(daemon)
        for mode in ("socks5", "connect", "http"):
            for _ in range(5):
                stream = await _open_transfer(port, origin, mode, "/forever")
                await stream.aclose()


# --------------------------------------------------------------------------------------------
# SOCKS5 UDP ASSOCIATE: the association lives as long as its control connection


async def _udp_echo(sock: anyio.abc.UDPSocket) -> None:
    async for data, (host, port) in sock:
        await sock.sendto(b"echo:" + data, host, port)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("kind", ["ostp", "direct"])
async def test_udp_associate_control_connection_leaves_nothing(
    server: ServerProcess, kind: str, reset: bool
) -> None:
    async with (
        await anyio.create_udp_socket(local_host="127.0.0.1") as echo,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_udp_echo, echo)
        echo_addr = Address("127.0.0.1", echo.extra(anyio.abc.SocketAttribute.local_port))
        async with leak_checked(kind, server) as daemon:
            for _ in range(5):
                control = await _socks_connect_udp(proxy_port(daemon))
                relay = control[1]
                async with await anyio.create_udp_socket(local_host="127.0.0.1") as client:
                    with anyio.fail_after(15):
                        await client.sendto(encode_udp_packet(echo_addr, b"hi"), *relay)
                        data, _ = await client.receive()
                    assert parse_udp_packet(data).payload == b"echo:hi"
                if reset:
                    _abort(control[0])
                await control[0].aclose()
        tg.cancel_scope.cancel()


async def _socks_connect_udp(port: int) -> tuple[anyio.abc.SocketStream, tuple[str, int]]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
    reply = b""
    while len(reply) < 2 + 10:
        reply += await stream.receive()
    assert reply[:4] == b"\x05\x00\x05\x00", reply
    host = socket.inet_ntoa(reply[6:10])
    (relay_port,) = struct.unpack("!H", reply[10:12])
    return stream, (host, relay_port)


async def test_leak_helpers_see_close_wait() -> None:
    # the check itself must be able to fail: a socket whose peer closed, not closed here
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    client.close()
    try:
        assert await settle(lambda: bool(close_wait_sockets()), 5)
    finally:
        accepted.close()
        listener.close()
    assert not close_wait_sockets()
