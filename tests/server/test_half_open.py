"""Half-open sessions cannot lock real clients out (reliability issue item 10).

Valid first messages that are never followed by anything fill the session table; once they
are ``half_open_timeout`` old, each new handshake ends the oldest of them. A session that sent
anything since its handshake is never ended by this rule. The server's clock is injected, so
"old enough" is reached without waiting.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from ostp_proto import ClientConnection, ConnectionConfig
from ostp_server import OstpServer

from .helpers import KEY, make_config, poll_until, tcp_echo
from .tunnel import Tunnel, tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

FAST_FAIL = ConnectionConfig(handshake_timeout=0.3, handshake_attempts=2)


class Clock:
    """The monotonic clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@asynccontextmanager
async def clocked_server(clock: Clock, **overrides: Any) -> AsyncIterator[OstpServer]:
    srv = OstpServer(make_config(**overrides), clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(srv.run)
        try:
            yield srv
        finally:
            tg.cancel_scope.cancel()


def first_datagram() -> bytes:
    c = ClientConnection(access_key=KEY)
    c.connect(time.monotonic(), time.time())
    (d,) = c.datagrams_to_send(time.monotonic())
    return d


async def sessions_at_least(srv: OstpServer, n: int) -> None:
    await poll_until(lambda: len(srv.sessions) >= n, limit=30)


async def fill_with_first_messages(srv: OstpServer, count: int) -> None:
    """``count`` valid first messages, never followed by anything.

    Each from its own loopback address (a session per address), in batches no larger than
    the server's receive buffer surely holds.
    """
    datagrams = [first_datagram() for _ in range(count)]
    start = len(srv.sessions)
    for i in range(0, count, 50):
        for j in range(i, min(count, i + 50)):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.bind((f"127.{1 + j // 250}.0.{1 + j % 250}", 0))
                attacker.sendto(datagrams[j], srv.addresses[0])
        await sessions_at_least(srv, start + min(count, i + 50))
    assert len(srv.sessions) == start + count


async def echo(t: Tunnel, port: int, data: bytes) -> None:
    sid = await t.open(f"127.0.0.1:{port}")
    await t.write(sid, data)
    assert await t.read(sid, len(data)) == data


async def refused(addr: tuple[str, int]) -> None:
    async with tunnel(addr, KEY, config=FAST_FAIL) as t:
        with pytest.raises(AssertionError, match="handshake timed out"):
            await t.handshake()


async def test_half_open_sessions_make_room_and_busy_ones_stay() -> None:
    clock = Clock()
    async with clocked_server(clock, max_sessions=4) as srv, tcp_echo() as port:
        addr = srv.addresses[0]
        timeout = srv.config.half_open_timeout
        assert timeout == 10.0  # the documented default
        async with tunnel(addr, KEY) as busy:
            await echo(busy, port, b"before")
            await fill_with_first_messages(srv, 3)
            # the table is full and the half-open sessions are young: refused
            await refused(addr)
            assert srv.stats.half_open_evictions == 0 and srv.stats.session_cap_drop > 0
            clock.offset += timeout + 1
            async with tunnel(addr, KEY) as b, tunnel(addr, KEY) as c, tunnel(addr, KEY) as d:
                for t in (b, c, d):
                    await echo(t, port, b"room for a real client")
                assert srv.stats.half_open_evictions == 3
                # everyone in the table has spoken: however old, nobody is evicted any more
                clock.offset += timeout + 1
                await refused(addr)
                assert srv.stats.half_open_evictions == 3
                assert len(srv.sessions) == 4
                await echo(busy, port, b"after")


async def test_a_session_that_only_pinged_is_not_half_open() -> None:
    """Any authenticated datagram counts: an idle client's Ping keeps its session."""
    clock = Clock()
    async with clocked_server(clock, max_sessions=1) as srv:
        addr = srv.addresses[0]
        async with tunnel(addr, KEY) as idle:
            await idle.handshake()
            await idle.wait(lambda: idle.conn.ping_rtt is not None)
            clock.offset += srv.config.half_open_timeout + 1
            await refused(addr)
            assert srv.stats.half_open_evictions == 0
            assert idle.terminated is None


async def test_default_table_of_1024_first_messages() -> None:
    clock = Clock()
    async with clocked_server(clock) as srv, tcp_echo() as port:
        assert srv.config.max_sessions == 1024
        await fill_with_first_messages(srv, 1024)
        await refused(srv.addresses[0])
        clock.offset += srv.config.half_open_timeout + 1
        async with tunnel(srv.addresses[0], KEY) as t:
            await echo(t, port, b"x" * 100_000)
        assert srv.stats.half_open_evictions == 1
        assert len(srv.sessions) == 1024


async def test_half_open_sessions_are_not_in_the_roaming_scan() -> None:
    """The scan unmasks every datagram from an unknown address with each session's key; a
    table full of half-open sessions must not make that cost the server anything."""
    async with (
        clocked_server(Clock(), max_sessions=64) as srv,
        tcp_echo() as port,
        tunnel(srv.addresses[0], KEY) as spoke,
    ):
        await echo(spoke, port, b"spoke")
        await fill_with_first_messages(srv, 32)
        scanned: list[int] = []
        for session in srv.sessions.values():
            conn = session.conn
            real = conn.matches

            def spy(data: bytes, real: Any = real, sid: int = conn.session_id) -> bool:
                scanned.append(sid)
                return bool(real(data))

            conn.matches = spy  # type: ignore[method-assign]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.1", 0))
            stranger.sendto(b"\x00" * 100, srv.addresses[0])
        await poll_until(lambda: srv.stats.unauthenticated_drop > 0)
        assert scanned == [spoke.conn.session_id]
