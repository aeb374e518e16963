"""Daemon behaviour: live-connection registry, graceful stop, quiet connection noise."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator

import anyio
import pytest
from anyio.abc import TaskStatus

from ostp_client.cli import _os_error_in
from ostp_client.flow import Address
from ostp_client.inbounds.base import StartError, os_reason
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound
from ostp_client.inbounds.proxy.socks5 import encode_address
from ostp_client.outbounds.block import BlockOutbound
from ostp_client.outbounds.direct import DirectOutbound
from tests.client.origin_server import BLOCK
from tests.client.proxy_helpers import (
    Origin,
    base_config,
    proxy_port,
    run_origin,
    running_daemon,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with run_origin() as server:
        yield server


async def _socks_connect(port: int, target: Address) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05\x01\x00\x05\x01\x00" + encode_address(target))
    reply = b""
    while len(reply) < 12:
        reply += await stream.receive()
    assert reply[:4] == b"\x05\x00\x05\x00"
    return stream


async def test_registry_shows_route_and_bytes(origin: Origin) -> None:
    config = base_config()
    config["routing"]["rules"].insert(0, {"port": [origin.port], "outbound": "direct"})
    async with running_daemon(config) as daemon:
        stream = await _socks_connect(proxy_port(daemon), Address("127.0.0.1", origin.port))
        await stream.send(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(BLOCK[:100]):
            received += await stream.receive()
        (conn,) = daemon.registry.snapshot()
        assert conn["inbound"] == "proxy-in"
        assert conn["destination"] == f"127.0.0.1:{origin.port}"
        assert (conn["rule"], conn["outbound"]) == (0, "direct")
        assert conn["bytes_up"] == len(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn["bytes_down"] == len(received)
        assert conn["source"].startswith("127.0.0.1:")
        assert daemon.router.stats()["rule_hits"] == [1, 0]
        await stream.aclose()
        await wait_for(lambda: not daemon.registry.live)
        assert daemon.registry.closed_total == 1


async def test_stop_with_open_connections(origin: Origin) -> None:
    with anyio.fail_after(15):
        async with running_daemon(base_config()) as daemon:
            port = proxy_port(daemon)
            streams = [
                await _socks_connect(port, Address("127.0.0.1", origin.port)) for _ in range(5)
            ]
            idle = await anyio.connect_tcp("127.0.0.1", port)  # never says anything
            assert len(daemon.registry.live) == 6
            daemon.stop()
        for stream in streams:
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
            await stream.aclose()
        await idle.aclose()


async def test_client_reset_mid_download_is_only_debug_noise(
    origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ostp_client")
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        for _ in range(5):
            stream = await _socks_connect(port, Address("127.0.0.1", origin.port))
            await stream.send(b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await stream.receive()
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # RST
        await wait_for(lambda: not daemon.registry.live)
        inbound = daemon.inbounds["proxy-in"]
        assert isinstance(inbound, LocalProxyInbound)
        assert inbound.failed_handlers == 0
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


class _NoDevice(DirectOutbound):
    """An outbound whose start fails like a TUN without CAP_NET_ADMIN."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")


async def test_a_part_that_cannot_start_is_named_in_one_line() -> None:
    config = base_config()
    outbounds = {"direct": _NoDevice("direct"), "block": BlockOutbound("block")}
    with pytest.raises(ExceptionGroup) as failed:
        async with running_daemon(config, outbounds=outbounds):
            pytest.fail("the daemon started without its outbound")
    error = _os_error_in(failed.value)  # what `ostp-client run` prints, from nested groups
    assert isinstance(error, StartError)
    assert str(error) == 'outbound "direct" cannot start: operation not permitted'
    assert error.errno == errno.EPERM
    assert _os_error_in(ExceptionGroup("x", [failed.value, RuntimeError("bug")])) is None


def test_os_reason_reads_as_the_end_of_a_sentence() -> None:
    assert os_reason(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "address already in use"
    )
    assert os_reason(PermissionError(errno.EACCES, "Permission denied", "/dev/net/tun")) == (
        "permission denied (/dev/net/tun)"
    )
    assert os_reason(OSError("`ip link set ostp0 up` failed: RTNETLINK")) == (
        "`ip link set ostp0 up` failed: RTNETLINK"
    )
    assert os_reason(OSError(errno.EIO, "I/O error")) == "I/O error"  # an acronym stays
