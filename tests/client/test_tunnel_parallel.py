"""Many streams of one session sending at once: every one of them finishes, byte for byte.

Regression tests for streams that waited for the session to accept more data and were never
woken (only the last waiter was): parallel uploads hung, and most of 1,000 echo streams never
sent a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from ostp_client.outbounds.ostp import OstpOutbound
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
from tests.client.test_tunnel import _connected, _host, tunnel_config
from tests.client.tunnel_helpers import ServerProcess, ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

MB = 1024 * 1024


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path) as running:
        yield running


@pytest.mark.parametrize("count", [3, 8])
@pytest.mark.parametrize("mode", ["socks5h", "http", "connect"])
async def test_parallel_20mb_uploads_all_complete_byte_exact(
    origin: Origin, server: ServerProcess, mode: str, count: int, tmp_path: Path
) -> None:
    data = os.urandom(20 * MB)
    upload = tmp_path / "upload"
    upload.write_bytes(data)
    expected = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    answers: list[object] = []
    async with running_daemon(tunnel_config(server.outbound())) as daemon:
        await _connected(daemon)
        args = [*proxy_args(mode, proxy_port(daemon)), "--data-binary", f"@{upload}"]
        url = origin.url("/upload", host=_host(mode))

        async def one() -> None:
            result = await curl([*args, url], time_limit=120)
            assert result.returncode == 0, result.stderr
            answers.append(json.loads(result.stdout))

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
    assert answers == [expected] * count


async def _echo(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(65536))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def test_1000_echo_streams_of_16kb_all_complete(server: ServerProcess) -> None:
    count, size = 1000, 16 * 1024
    done: list[int] = []
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1", backlog=2048) as listener,
        anyio.create_task_group() as echo_tg,
    ):
        echo_tg.start_soon(listener.serve, _echo)
        echo_port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        async with running_daemon(tunnel_config(server.outbound())) as daemon:
            await _connected(daemon)
            port = proxy_port(daemon)
            target = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")

            async def one(index: int) -> None:
                payload = index.to_bytes(4, "big") * (size // 4)
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(b"\x05\x01\x00")
                    assert await stream.receive(2) == b"\x05\x00"
                    await stream.send(target)
                    reply = b""
                    while len(reply) < 10:
                        reply += await stream.receive(10 - len(reply))
                    assert reply[1] == 0, reply
                    await stream.send(payload)
                    got = bytearray()
                    while len(got) < size:
                        got += await stream.receive()
                    assert bytes(got) == payload
                done.append(index)

            with anyio.fail_after(200):
                async with anyio.create_task_group() as tg:
                    for index in range(count):
                        tg.start_soon(one, index)
            # every stream ended both ways: no per-stream state is left behind
            outbound = daemon.outbounds["proxy"]
            assert isinstance(outbound, OstpOutbound)
            (session,) = outbound.sessions
            await wait_for(
                lambda: (
                    not session.channels and session.conn is not None and not session.conn._flows
                ),
                30,
            )
            assert session.conn is not None and session.conn.flow_control
        echo_tg.cancel_scope.cancel()
    assert sorted(done) == list(range(count))
