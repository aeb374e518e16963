"""The ostp outbound over TCP, end to end: real curl → ostp-client (transport tcp, wss or
reality) → a real ostp-server process → a local origin, 50 MB each way, byte for byte.

Also what a session over TCP must do that UDP does not: no retransmission into the stream, a
session that continues on a new TCP connection when the old one is cut, and a clear error when
the server does not accept the opening.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ostp_client.outbounds.ostp import OstpOutbound, _Session
from ostp_client.transport.stream import HIGH_WATER, StreamTransport
from ostp_proto.transport import (
    DatagramStream,
    Framing,
    LenU16Decoder,
    encode_key,
    encode_len_u16_many,
    generate_keypair,
)
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
from tests.client.tunnel_helpers import ServerProcess, ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

MB = 1024 * 1024
PRIVATE, PUBLIC = generate_keypair()
SHORT_ID = os.urandom(8).hex()
SERVER_NAME = "www.example.com"
REALITY_SERVER = {
    "reality": {
        "private_key": encode_key(PRIVATE),
        "short_id": SHORT_ID,
        "server_names": [SERVER_NAME],
    },
    "tcp_rate_limit": 0,
}


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path, **REALITY_SERVER) as running:
        yield running


def transport_fields(kind: str) -> dict[str, Any]:
    """The outbound fields that select ``kind`` (tcp, wss, reality over tcp)."""
    if kind == "reality":
        return {
            "transport": "tcp",
            "reality": {
                "public_key": encode_key(PUBLIC),
                "short_id": SHORT_ID,
                "server_name": SERVER_NAME,
            },
        }
    return {"transport": kind}


def _config(server: ServerProcess, **outbound: Any) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            server.outbound(reconnect_delay=0.3, **outbound),
            {"type": "direct", "tag": "direct"},
        ],
        "routing": {"rules": [], "default_outbound": "proxy"},
    }


def _session(daemon: Any) -> _Session:
    outbound = daemon.outbounds["proxy"]
    assert isinstance(outbound, OstpOutbound)
    return outbound.sessions[0]


async def _connected(daemon: Any, limit: float = 20) -> None:
    await wait_for(lambda: _session(daemon).state == "connected", limit)


async def download(daemon: Any, origin: Origin, size: int, out: Path) -> None:
    url = origin.url(f"/bytes/{size}")
    result = await curl(
        [*proxy_args("socks5h", proxy_port(daemon)), "-o", str(out), url], time_limit=150
    )
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
        assert handle.tell() == size
    assert digest.hexdigest() == body_sha256(size)


async def upload(daemon: Any, origin: Origin, size: int, tmp: Path) -> None:
    data = os.urandom(size)
    path = tmp / "upload"
    path.write_bytes(data)
    result = await curl(
        [
            *proxy_args("socks5h", proxy_port(daemon)),
            "--data-binary",
            f"@{path}",
            origin.url("/upload"),
        ],
        time_limit=150,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "length": size,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.parametrize("kind", ["tcp", "wss", "reality"])
async def test_50mb_each_way_byte_exact(
    origin: Origin, server: ServerProcess, tmp_path: Path, kind: str
) -> None:
    async with running_daemon(_config(server, **transport_fields(kind))) as daemon:
        await _connected(daemon)
        session = _session(daemon)
        assert isinstance(session.transport, StreamTransport)
        assert session.status()["transport"] == kind
        await download(daemon, origin, 50 * MB, tmp_path / "body")
        await upload(daemon, origin, 50 * MB, tmp_path)
        conn = session.conn
        assert conn is not None and conn.reliable_transport
        # TCP carries every datagram: the ARQ never sent one twice (nor probed) on its own
        stats = conn.sender.stats
        assert stats.retransmissions == 0 and stats.probe_timeouts == 0, stats
        assert session.reconnects == 0 and session.transport_switches == 0
        # large datagrams, batched writes: far fewer sends than datagrams
        transport = session.transport
        assert isinstance(transport, StreamTransport)
        assert transport.bytes_written > 50 * MB
        assert transport.bytes_written / transport.writes > 16 * 1024


async def test_session_continues_on_a_new_tcp_connection(
    origin: Origin, server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The TCP connection is cut mid-download: the same OSTP session carries on over a new one
    (the server keeps it for tcp_resume_grace) and the body arrives whole."""
    caplog.set_level(logging.INFO, "ostp_client")
    async with running_daemon(_config(server, transport="tcp")) as daemon:
        await _connected(daemon)
        session = _session(daemon)
        session_id = session.session_id
        first = session.transport
        assert isinstance(first, StreamTransport)

        async def cut_when_flowing() -> None:
            await wait_for(lambda: session.bytes_down > 5 * MB, 60)
            # the connection is cut (both ways) under the session's feet
            first.sock.shutdown(socket.SHUT_RDWR)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cut_when_flowing)
            await download(daemon, origin, 30 * MB, tmp_path / "body")
        assert session.transport is not first and isinstance(session.transport, StreamTransport)
        assert session.session_id == session_id and session.reconnects == 0
        assert session.transport_switches == 1
    assert "transport tcp -> tcp" in caplog.text


async def test_refused_opening_is_a_clear_error(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong access key: the server takes the request for a probe and answers 404; the
    session reports that, and keeps trying (it never pretends to be connected)."""
    caplog.set_level(logging.INFO, "ostp_client")
    config = _config(server, transport="tcp")
    config["outbounds"][0]["access_key"] = "not-the-key"
    async with running_daemon(config) as daemon:
        session = _session(daemon)
        await wait_for(lambda: session.last_error is not None, 20)
        assert session.state != "connected"
        assert "404" in (session.last_error or ""), session.last_error


async def test_stream_transport_blocks_at_high_water_and_drains_in_order() -> None:
    """A peer that stops reading: what the kernel does not take waits in the transport, which
    says `blocked` past its high-water mark (the session then takes nothing from its core);
    once the peer reads again the writer drains it all, in order, and wakes the session."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    codec = DatagramStream(Framing.STREAM, client=True)
    transport = StreamTransport(ours, codec, "tcp")
    woken = anyio.Event()
    transport.on_drained = woken.set
    sent: list[bytes] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(transport.run)
        n = 0
        while not transport.blocked:
            batch = [i.to_bytes(4, "big") + os.urandom(16 * 1024) for i in range(n, n + 8)]
            n += 8
            transport.send_batch(batch)
            sent.extend(batch)
            assert n < 10_000, "never blocked"
            await anyio.lowlevel.checkpoint()
        assert HIGH_WATER < transport.pending < HIGH_WATER + 9 * 16 * 1024
        decoder = LenU16Decoder()
        got: list[bytes] = []
        with anyio.fail_after(30):
            while len(got) < len(sent):
                await anyio.wait_readable(theirs)
                got.extend(decoder.feed(theirs.recv(1 << 20)))
            await woken.wait()
        assert got == sent
        assert (transport.pending, transport.blocked) == (0, False)
        tg.cancel_scope.cancel()
    transport.close()
    theirs.close()


async def test_stream_transport_reports_the_end_of_the_connection() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    codec = DatagramStream(Framing.STREAM, client=True)
    transport = StreamTransport(ours, codec, "tcp", early=[b"first"])
    theirs.sendall(encode_len_u16_many([b"a", b"b" * 3000]) + b"\x00")  # a partial frame
    theirs.close()
    got: list[bytes] = []
    for _ in range(3):  # a short read ends a round; the end shows in the next one at the latest
        got += transport.recv_batch()
    assert got == [b"first", b"a", b"b" * 3000]
    assert transport.failure == "the server closed the TCP connection"
    assert transport.send_batch([b"x"]) == 0  # nothing is written after the end
    transport.close()
    transport.close()  # idempotent
