"""The ostp outbound over TCP, end to end: real curl → ostp-client (transport tcp, wss or
reality) → a real ostp-server process → a local origin, 50 MB each way, byte for byte.

Also what a session over TCP must do that UDP does not: no retransmission into the stream, a
session that continues on a new TCP connection when the old one is cut, and a clear error when
the server does not accept the opening.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_client.outbounds.ostp import OstpOutbound, _Session
from ostp_client.transport import TransportError
from ostp_client.transport.stream import (
    HIGH_WATER,
    RealityOptions,
    StreamOptions,
    StreamTransport,
    open_stream,
)
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
REALITY_BLOCK = {
    "private_key": encode_key(PRIVATE),
    "short_id": SHORT_ID,
    "server_names": [SERVER_NAME],
}
REALITY_SERVER: dict[str, Any] = {"reality": REALITY_BLOCK, "tcp_rate_limit": 0}


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
        assert session.snapshot().transport == kind
        await download(daemon, origin, 50 * MB, tmp_path / "body")
        await upload(daemon, origin, 50 * MB, tmp_path)
        conn = session.conn
        assert conn is not None and conn.reliable_transport
        # TCP carries every datagram: the ARQ never re-sends one on its own (no probe timer, no
        # loss from ACK gaps); only what the server refused and asked for again (NACK)
        stats = conn.sender.stats
        assert stats.probe_timeouts == 0, stats
        assert stats.retransmissions == 0 or stats.nack_retransmissions > 0, stats
        assert session.reconnects == 0 and session.transport_switches == 0
        # large datagrams, several to a write
        transport = session.transport
        assert isinstance(transport, StreamTransport)
        assert transport.bytes_written > 50 * MB
        per_write = transport.bytes_written / transport.writes
        assert per_write > 16 * 1024, (transport.bytes_written, transport.writes)


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


DECOY_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: decoy\r\nContent-Length: 5\r\nConnection: close\r\n\r\ndecoy"
)


@asynccontextmanager
async def decoy() -> AsyncIterator[tuple[int, list[bytes]]]:
    """The real site behind the server (``reality.dest``): reads what comes (until a pause or
    EOF), records it and answers a fixed page."""
    seen: list[bytes] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            got = b""
            with anyio.move_on_after(1):  # probes send what they send, then wait
                try:
                    while True:
                        got += await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            seen.append(got)
            await stream.send(DECOY_ANSWER)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port)), seen
        tg.cancel_scope.cancel()


@asynccontextmanager
async def tap(port: int) -> AsyncIterator[tuple[int, bytearray]]:
    """A TCP relay to 127.0.0.1:``port`` that records what the client sends."""
    recorded = bytearray()

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", port) as server:

            async def up() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        data = await client.receive(65536)
                        recorded.extend(data)
                        await server.send(data)

            async with anyio.create_task_group() as tg:
                tg.start_soon(up)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        await client.send(await server.receive(65536))
                tg.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port)), recorded
        tg.cancel_scope.cancel()


async def _exchange(port: int, data: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        got = b""
        with anyio.fail_after(20), contextlib.suppress(anyio.EndOfStream):
            while True:
                got += await stream.receive(65536)
        return got


async def test_probes_and_a_replayed_client_hello_meet_the_decoy(tmp_path: Path) -> None:
    """What a prober sees: curl without a token gets the real site's page; the hello our
    client sends (its own code path, recorded on the way) opens the connection once, and sent
    again (a replay) it reaches the real site byte for byte, as does a hello for a wrong key."""
    require_curl()
    async with decoy() as (dest, seen):
        reality = {**REALITY_BLOCK, "dest": f"127.0.0.1:{dest}"}
        with ostp_server(tmp_path, reality=reality, tcp_rate_limit=0) as srv:
            page = await curl(["-si", f"http://127.0.0.1:{srv.port}/"])
            assert page.returncode == 0, page.stderr
            assert page.stdout.encode() == DECOY_ANSWER
            assert seen[-1].startswith(b"GET / HTTP/1.1\r\n")

            options = StreamOptions(
                framing=Framing.STREAM,
                host=SERVER_NAME,
                reality=RealityOptions(PUBLIC, bytes.fromhex(SHORT_ID), SERVER_NAME),
            )
            async with tap(srv.port) as (tap_port, recorded):
                genuine = await open_stream(("127.0.0.1", tap_port), srv.key, options)
                genuine.close()
            hello = bytes(recorded)
            assert hello[:3] == b"\x16\x03\x01"  # a TLS ClientHello record
            answer = await _exchange(srv.port, hello)
            assert answer == DECOY_ANSWER
            assert seen[-1] == hello  # every byte the server had read reached the site

            stranger = replace(
                options,
                reality=RealityOptions(generate_keypair()[1], bytes.fromhex(SHORT_ID), SERVER_NAME),
            )
            with pytest.raises(TransportError, match="the server refused"):
                await open_stream(("127.0.0.1", srv.port), srv.key, stranger)
            assert seen[-1][:3] == b"\x16\x03\x01" and len(seen) == 3


async def test_a_low_order_reality_key_is_a_clear_error() -> None:
    """An all-zero `public_key` (valid base64url, 32 bytes) cannot make a shared secret."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        options = StreamOptions(
            framing=Framing.STREAM,
            host=SERVER_NAME,
            reality=RealityOptions(bytes(32), bytes.fromhex(SHORT_ID), SERVER_NAME),
        )
        with pytest.raises(TransportError, match="low order"):
            await open_stream(listener.getsockname()[:2], "k", options)
    finally:
        listener.close()
