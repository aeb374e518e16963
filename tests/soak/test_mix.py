"""The soak's judge, against a fake proxy that breaks transfers in each way on purpose.

A soak that passes must be able to fail: a body cut short with a clean end is ``short``, a
reset is an ``error`` (allowed only across a restart), a changed byte is a ``mismatch``, a
stall is a ``hang``, whatever the framing (Content-Length, chunked, close-delimited).
"""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc
import pytest

from tests.client.origin_server import seeded_bytes
from tests.soak.mix import Mix, Op

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SIZE = 200_000


async def _fake_proxy(stream: anyio.abc.SocketStream, behaviour: str) -> None:
    """SOCKS5 without authentication, then one HTTP answer broken as ``behaviour`` says."""
    data = b""
    while len(data) < 3 + 10:  # greeting and CONNECT to an IPv4 address
        data += await stream.receive()
    await stream.send(b"\x05\x00\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50")
    while b"\r\n\r\n" not in data[13:]:
        data += await stream.receive()
    path = data[13:].split(b" ")[1].decode()
    seed, size = (int(part) for part in path.split("/")[2:4])
    body = bytearray(seeded_bytes(seed, 0, size))
    half = bytes(body[: size // 2])
    if behaviour == "corrupt":
        body[size // 3] ^= 1
    if behaviour in ("whole", "corrupt"):
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
    elif behaviour in ("fin-early", "rst-early"):
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + half)
    elif behaviour == "close-delimited-fin-early":
        await stream.send(b"HTTP/1.0 200 OK\r\n\r\n" + half)
    elif behaviour == "chunked-complete-but-short":
        await stream.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(half)
            + half
            + b"\r\n0\r\n\r\n"
        )
    elif behaviour == "stall":
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + half)
        await anyio.sleep(30)
    if behaviour == "rst-early":
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [
        ("whole", "ok"),
        ("fin-early", "short"),
        ("close-delimited-fin-early", "short"),
        ("chunked-complete-but-short", "short"),
        ("rst-early", "error"),
        ("corrupt", "mismatch"),
        ("stall", "hang"),
    ],
)
async def test_each_way_a_transfer_breaks_gets_its_outcome(behaviour: str, outcome: str) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    mix = Mix(port, 80, 9, "/nonexistent", seed=1, handshake_timeout=10)
    op = mix.new_op("download", "socks5", SIZE)

    async def work() -> None:
        conn, prefix = await mix.open("socks5")
        try:
            await mix.get(conn, prefix, op, seed=3)
        finally:
            await conn.aclose()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, lambda stream: _fake_proxy(stream, behaviour))
        await mix.guarded(op, 3.0, work)
        tg.cancel_scope.cancel()
    assert op.outcome == outcome, op.describe()
    assert (op in mix.failures()) == (outcome != "ok"), op.describe()


def test_errors_are_allowed_only_across_a_restart() -> None:
    mix = Mix(1, 2, 3, "/nonexistent", seed=1, handshake_timeout=10)
    mix.windows.append((10.0, 12.0))
    cases = {(9.0, 10.5): True, (11.0, 11.5): True, (11.9, 30.0): True, (5.0, 9.9): False}
    for (start, end), allowed in cases.items():
        op = Op("get", "socks5", 1, "mix", start, end, "error", "ECONNRESET")
        mix.ops = [op]
        assert (mix.failures() == []) == allowed, (start, end)
    mix.ops = [Op("get", "socks5", 1, "mix", 11.0, 11.5, "short", "clean end")]
    assert mix.failures(), "a short success fails the soak even during a restart"
