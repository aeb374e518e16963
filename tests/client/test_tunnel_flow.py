"""A reader that stops holds only its own stream: the rest of the session goes on.

Real daemon, real ostp-server process, real origin, all on loopback. One download is left
unread for as long as the test needs; meanwhile other fetches on the SAME session must complete
and new connections must open. Then the stopped download is read to the end, byte for byte.
With an ostp-py server per-stream flow control keeps the stopped stream's buffer within its
window; with a server that does not negotiate it (upstream-like) the session keeps reading
and buffers, below its total cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from ostp_client.outbounds.ostp import OstpOutbound, OstpStream, SessionStatus
from ostp_proto import ConnectionStats
from tests.client.origin_server import body_bytes, body_sha256
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
from tests.client.test_tunnel import _connected, tunnel_config
from tests.client.tunnel_helpers import ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

MB = 1024 * 1024


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _ostp(daemon: object) -> OstpOutbound:
    outbound = daemon.outbounds["proxy"]  # type: ignore[attr-defined]
    assert isinstance(outbound, OstpOutbound)
    return outbound


async def _get(port: int, origin: Origin, path: str) -> anyio.abc.SocketStream:
    """A SOCKS5 connection through the daemon with a GET sent, nothing read yet."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05\x01\x00")
    assert await stream.receive(2) == b"\x05\x00"
    await stream.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + origin.port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        reply += await stream.receive(10 - len(reply))
    assert reply[1] == 0, reply
    await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return stream


async def _read_body(stream: anyio.abc.SocketStream, size: int) -> bytes:
    data = bytearray()
    start = -1
    while start < 0 or len(data) - start < size:
        data += await stream.receive(1 << 20)
        if start < 0 and (end := data.find(b"\r\n\r\n")) >= 0:
            assert data.startswith(b"HTTP/1.1 200"), bytes(data[:100])
            start = end + 4
    return bytes(data[start : start + size])


def _stopped_stream(outbound: OstpOutbound) -> OstpStream:
    """The one stream of the session that holds data for its reader."""
    (session,) = outbound.sessions
    streams = [c for c in session.channels.values() if isinstance(c, OstpStream) and c.buffered]
    assert len(streams) == 1, streams
    return streams[0]


@dataclass
class Outcome:
    session: SessionStatus
    """The session's status at the end."""
    stats: ConnectionStats
    excess: int
    """Peak of the stopped stream's buffer minus its window (flow control only)."""


async def _fetches_beside_a_stopped_reader(
    origin: Origin, tmp_path: Path, size: int, **server: object
) -> Outcome:
    with ostp_server(tmp_path, **server) as running:
        config = tunnel_config(running.outbound())
        async with running_daemon(config) as daemon:
            await _connected(daemon)
            outbound = _ostp(daemon)
            (session,) = outbound.sessions
            port = proxy_port(daemon)
            stopped = await _get(port, origin, f"/bytes/{size}")
            # the reader takes nothing: the kernel's socket buffers fill, then the stream's
            await wait_for(lambda: session.buffered >= 128 * 1024, 60)
            held = _stopped_stream(outbound)
            excess = -(1 << 62)

            async def watch() -> None:
                nonlocal excess
                while True:
                    conn = session.conn
                    window = conn.stream_receive_window(held.stream_id) if conn else None
                    if window is not None:
                        excess = max(excess, held.buffered - window)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                # the same session: a small fetch with curl, and new connections, all complete
                for _ in range(3):
                    result = await curl(
                        [
                            *proxy_args("socks5h", port),
                            "-o",
                            str(tmp_path / "small"),
                            origin.url("/bytes/1000"),
                        ],
                        time_limit=30,
                    )
                    assert result.returncode == 0, result.stderr
                    assert (tmp_path / "small").read_bytes() == body_bytes(1000)
                with anyio.fail_after(30):
                    for _ in range(5):
                        async with await _get(port, origin, "/bytes/20000") as other:
                            got = await _read_body(other, 20000)
                        assert hashlib.sha256(got).hexdigest() == body_sha256(20000)
                assert len(outbound.sessions) == 1 and held.buffered > 0  # still stopped
                # the reader comes back: everything arrives, byte for byte
                with anyio.fail_after(120):
                    rest = await _read_body(stopped, size)
                await stopped.aclose()
                tg.cancel_scope.cancel()
            assert hashlib.sha256(rest).hexdigest() == body_sha256(size)
            assert session.conn is not None
            (status,) = outbound.status().sessions
            return Outcome(status, dataclasses.replace(session.conn.stats), excess)


async def test_a_stopped_reader_holds_only_its_own_stream(origin: Origin, tmp_path: Path) -> None:
    outcome = await _fetches_beside_a_stopped_reader(origin, tmp_path, 64 * MB)
    assert outcome.session.flow_control is True
    assert outcome.excess <= 0  # the stopped stream never buffered more than its window
    assert outcome.stats.paused_drop == 0 and outcome.stats.flow_violation == 0
    assert outcome.stats.window_updates_sent > 0


async def test_a_stopped_reader_with_an_upstream_like_server(
    origin: Origin, tmp_path: Path
) -> None:
    """Without the extension the session keeps reading (no hold, no pause below the cap)."""
    outcome = await _fetches_beside_a_stopped_reader(origin, tmp_path, 24 * MB, extensions=False)
    assert outcome.session.flow_control is False
    assert outcome.stats.paused_drop == 0 and outcome.stats.relay_decode_drop == 0
    assert outcome.stats.window_updates_sent == 0


async def test_past_the_total_cap_an_upstream_like_session_pauses_and_recovers(
    origin: Origin, tmp_path: Path
) -> None:
    """The last resort: all streams together buffer the cap; Data is refused unacknowledged
    (the server sends it again) until the reader catches up; nothing is lost."""
    size = 24 * MB
    with ostp_server(tmp_path, extensions=False) as running:
        outbound_config = running.outbound(receive_buffer_cap=4 * MB)
        async with running_daemon(tunnel_config(outbound_config)) as daemon:
            await _connected(daemon)
            outbound = _ostp(daemon)
            (session,) = outbound.sessions
            stopped = await _get(proxy_port(daemon), origin, f"/bytes/{size}")
            await wait_for(lambda: session.conn is not None and session.conn.receive_paused, 60)
            with anyio.fail_after(120):
                rest = await _read_body(stopped, size)
            await stopped.aclose()
            conn = session.conn
            assert conn is not None and conn.stats.paused_drop > 0
            assert not conn.receive_paused
    assert hashlib.sha256(rest).hexdigest() == body_sha256(size)
