"""Sessions: silence towards anything unauthenticated, the cap, idle eviction, roaming."""

from __future__ import annotations

import os
import random
import socket
import time

import anyio
import pytest
from anyio.abc import TaskStatus

from ostp_proto import ClientConnection, ConnectionConfig
from ostp_server import OstpServer, serve
from tests.conftest import require

from .helpers import KEY, OTHER_KEY, make_config, no_reply, poll_until, server, tcp_echo
from .tunnel import tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def first_datagram(key: str, unix_offset: float = 0.0) -> bytes:
    c = ClientConnection(access_key=key)
    c.connect(time.monotonic(), time.time() + unix_offset)
    (d,) = c.datagrams_to_send(time.monotonic())
    return d


async def test_silence_towards_everything_unauthenticated() -> None:
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        addr = srv.addresses[0]
        sid = await t.open(f"127.0.0.1:{port}")
        assert len(t.first_datagrams) == 1
        probe = udp_socket()
        try:
            # a wrong key
            probe.sendto(first_datagram(OTHER_KEY), addr)
            assert await no_reply(probe)
            # a timestamp 400 s old (and 400 s ahead)
            probe.sendto(first_datagram(KEY, -400), addr)
            probe.sendto(first_datagram(KEY, +400), addr)
            await poll_until(lambda: srv.acceptor.stats.timestamp_drop == 2, limit=30)
            assert await no_reply(probe)
            # the real client's first datagram, replayed from another address
            probe.sendto(t.first_datagrams[0], addr)
            await poll_until(lambda: srv.acceptor.stats.replay_drop == 1, limit=30)
            assert await no_reply(probe)
            # 10,000 random datagrams of random sizes, in batches of 200: each batch is sent once
            # the server has dropped the previous one, so the kernel never has to drop any
            rng = random.Random(3)
            target = srv.stats.unauthenticated_drop
            for i in range(10_000):
                probe.sendto(rng.randbytes(rng.choice((1, 4, 7, 12, 40, 100, 300, 1400))), addr)
                target += 1
                if i % 200 == 199:  # (the lambda runs before the loop moves on)
                    await poll_until(lambda: srv.stats.unauthenticated_drop >= target, 30)  # noqa: B023
            assert await no_reply(probe, 1.0)
        finally:
            probe.close()
        assert srv.stats.unauthenticated_drop >= 10_000 + 4
        assert srv.acceptor.stats.accepted == 1
        assert len(srv.sessions) == 1
        # the real session is still served
        await t.write(sid, b"still here")
        assert await t.read(sid, 10) == b"still here"


async def test_session_cap_holds() -> None:
    fast_fail = ConnectionConfig(handshake_timeout=0.3, handshake_attempts=2)
    async with server(max_sessions=2) as srv:
        addr = srv.addresses[0]
        async with tunnel(addr, KEY) as a, tunnel(addr, KEY) as b:
            await a.handshake()
            await b.handshake()
            async with tunnel(addr, KEY, config=fast_fail) as c:
                with pytest.raises(AssertionError, match="handshake timed out"):
                    await c.handshake()
            assert len(srv.sessions) == 2
            assert srv.stats.session_cap_drop == 2
            assert srv.acceptor.stats.accepted == 4  # authenticated, then refused by the cap


async def test_idle_sessions_are_evicted() -> None:
    quiet = ConnectionConfig(keepalive_interval=None)
    async with server(idle_timeout=0.5) as srv, tunnel(srv.addresses[0], KEY, config=quiet) as t:
        await t.handshake()
        assert len(srv.sessions) == 1
        await poll_until(lambda: not srv.sessions)
        assert srv.stats.sessions_ended == 1
        assert srv.key_stats[0].active == 0


async def test_roaming_mid_transfer_completes_byte_exact() -> None:
    payload = os.urandom(8 * 1024 * 1024)
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        old_port = t.local_port
        st = t.streams[sid]

        async def roam() -> None:
            await t.wait(lambda: len(st.received) > len(payload) // 3)
            new_port = t.rebind()
            assert new_port != old_port

        async with anyio.create_task_group() as tg:
            tg.start_soon(t.write, sid, payload)
            tg.start_soon(roam)
            got = await t.read(sid, len(payload))
        assert got == payload
        assert srv.stats.roam_rebinds == 1
        (session,) = srv.sessions.values()
        assert session.addr[1] == t.local_port


async def test_roaming_needs_authentication() -> None:
    """A header that matches but does not decrypt (or a replay) never moves the session."""
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        (session,) = srv.sessions.values()
        home = session.addr
        captured: list[bytes] = []
        real_sendto = t.sock.sendto

        def spy(data: bytes, addr: tuple[str, int]) -> int:
            captured.append(data)
            return real_sendto(data, addr)

        t.sock = _Spy(t.sock, spy)  # type: ignore[assignment]
        await t.write(sid, b"x" * 5000)
        await t.read(sid, 5000)
        t.sock = t.sock._sock  # type: ignore[attr-defined]
        attacker = udp_socket()
        try:
            for d in captured[:3]:
                attacker.sendto(d, srv.addresses[0])  # replays
                forged = bytearray(d)
                forged[-1] ^= 1  # header intact, tag broken
                attacker.sendto(bytes(forged), srv.addresses[0])
            assert await no_reply(attacker)
        finally:
            attacker.close()
        assert session.addr == home
        assert srv.stats.roam_rebinds == 0
        await t.write(sid, b"ok")
        assert await t.read(sid, 5002) == b"x" * 5000 + b"ok"


class _Spy:
    def __init__(self, sock: socket.socket, sendto: object) -> None:
        self._sock = sock
        self.sendto = sendto

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_ipv6_listen() -> None:
    require(_ipv6_loopback(), "needs IPv6 on loopback (::1)")
    async with (
        server(listen=["127.0.0.1:0", "[::1]:0"]) as srv,
        tcp_echo() as port,
        tunnel(srv.addresses[1], KEY) as t,
    ):
        assert srv.addresses[1][0] == "::1"
        sid = await t.open(f"127.0.0.1:{port}")
        await t.write(sid, b"over v6")
        assert await t.read(sid, 7) == b"over v6"


async def test_shutdown_sends_close_to_clients() -> None:
    server_scope = anyio.CancelScope()

    async def run_server(*, task_status: TaskStatus[OstpServer]) -> None:
        with server_scope:
            await serve(make_config(), task_status=task_status)

    async with anyio.create_task_group() as tg:
        srv = await tg.start(run_server)
        async with tunnel(srv.addresses[0], KEY) as t:
            await t.handshake()
            server_scope.cancel()
            await poll_until(lambda: t.terminated is not None)
            assert t.terminated == "closed by peer"


async def test_traffic_limit_ends_the_session_and_refuses_new_ones() -> None:
    fast_fail = ConnectionConfig(handshake_timeout=0.3, handshake_attempts=2)
    users = [{"name": "capped", "key": KEY, "limit_bytes": 300_000}]
    async with server(access_keys=users) as srv, tcp_echo() as port:
        addr = srv.addresses[0]
        async with tunnel(addr, KEY) as t:
            sid = await t.open(f"127.0.0.1:{port}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(t.write, sid, os.urandom(1_000_000))
                await poll_until(lambda: not srv.sessions)
                tg.cancel_scope.cancel()
        stats = srv.key_stats[0]
        assert stats.over_limit and stats.label == "capped"
        assert stats.bytes_up + stats.bytes_down < 1_000_000  # cut off, not served to the end
        async with tunnel(addr, KEY, config=fast_fail) as again:
            with pytest.raises(AssertionError, match="handshake timed out"):
                await again.handshake()
        assert srv.stats.limit_drop >= 1 and not srv.sessions
