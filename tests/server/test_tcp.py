"""The server's TCP side end to end on loopback (spec §10.6): /stream, /wss and Reality carry
OSTP byte-exact; probes see the real site (a local decoy); the rate limit; slow, stalled and
garbage-sending peers never hold up other sessions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_proto import RemoteProtocolError
from ostp_proto.transport import Framing, RealityClient, encode_key, make_token
from ostp_proto.transport import reality as R
from ostp_proto.transport import xhttp as X
from ostp_server import OstpServer

from .helpers import KEY, poll_until, server, tcp_echo
from .tcp_tunnel import TcpTunnel, tcp_tunnel

pytestmark = pytest.mark.anyio

PRIVATE = bytes(range(100, 132))
PUBLIC = R.public_key(PRIVATE)
SHORT_ID = "0123456789abcdef"
SNI = "www.example.com"
BANNER = b"HTTP/1.1 200 OK\r\nServer: decoy\r\n\r\n"


@asynccontextmanager
async def decoy() -> AsyncIterator[tuple[int, list[bytes]]]:
    """The 'real site': answers a banner, then echoes every byte until EOF."""
    seen: list[bytes] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            got = b""
            await stream.send(BANNER)
            try:
                while True:
                    chunk = await stream.receive(65536)
                    got += chunk
                    await stream.send(chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
            seen.append(got)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port)), seen
        tg.cancel_scope.cancel()


def reality_block(dest_port: int | None) -> dict[str, Any]:
    block: dict[str, Any] = {
        "private_key": encode_key(PRIVATE),
        "short_id": SHORT_ID,
        "server_names": [SNI],
    }
    if dest_port is not None:
        block["dest"] = f"127.0.0.1:{dest_port}"
    return block


def reality_client(sni: str = SNI) -> RealityClient:
    return RealityClient(server_public=PUBLIC, short_id=bytes.fromhex(SHORT_ID), sni=sni)


async def exchange(port: int, data: bytes, *, local_host: str | None = None) -> bytes:
    """Send ``data``, half-close, read everything until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port, local_host=local_host) as stream:
        if data:
            await stream.send(data)
        await stream.send_eof()
        got = b""
        with anyio.fail_after(20):
            try:
                while True:
                    got += await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        return got


def tcp_port(srv: OstpServer) -> int:
    assert srv.tcp is not None
    return srv.tcp.addresses[0][1]


# ------------------------------------------------------------------------------ transports


@pytest.mark.parametrize("kind", ["stream", "wss", "reality"])
async def test_tcp_transports_carry_50_mb_byte_exact(kind: str) -> None:
    async with (
        decoy() as (dest, _),
        tcp_echo() as echo,
        server(reality=reality_block(dest), tcp_rate_limit=0) as srv,
    ):
        port = srv.addresses[0][1]
        assert tcp_port(srv) == port  # TCP on the UDP port (spec §9.1)
        framing = Framing.WSS if kind == "wss" else Framing.STREAM
        client = reality_client() if kind == "reality" else None
        async with tcp_tunnel(("127.0.0.1", port), KEY, framing, reality=client) as t:
            sid = await t.open(f"127.0.0.1:{echo}")
            payload = os.urandom(50 << 20)
            async with anyio.create_task_group() as tg:
                tg.start_soon(t.write, sid, payload)
                got = await t.read(sid, len(payload), limit=240)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            (session,) = srv.sessions.values()
            assert session.listener.tcp is not None
            assert session.conn.reliable_transport and t.conn.reliable_transport
            # TCP is reliable: no timer re-sends either way; the client re-sends only what the
            # server refused while its remote was slow (asked for by NACK)
            assert session.conn.sender.stats.retransmissions == 0
            assert session.conn.sender.stats.probe_timeouts == 0
            assert t.conn.sender.stats.probe_timeouts == 0
            assert (t.conn.sender.stats.retransmissions == 0) is (
                session.stats.backpressure_drop == 0
            )
        stats = srv.tcp.stats if srv.tcp is not None else None
        assert stats is not None
        assert (stats.accepted_stream, stats.accepted_wss, stats.accepted_reality) == (
            int(kind == "stream"),
            int(kind == "wss"),
            int(kind == "reality"),
        )


async def test_session_ends_with_its_tcp_connection() -> None:
    async with tcp_echo() as echo, server(tcp_resume_grace=0) as srv:
        port = srv.addresses[0][1]
        async with tcp_tunnel(("127.0.0.1", port), KEY, Framing.STREAM) as t:
            sid = await t.open(f"127.0.0.1:{echo}")
            await t.write(sid, b"ping")
            assert await t.read(sid, 4) == b"ping"
            assert len(srv.sessions) == 1
        await poll_until(lambda: not srv.sessions)
        assert srv.stats.sessions_ended == 1


@pytest.mark.parametrize("framing", list(Framing))
async def test_session_continues_on_a_new_tcp_connection(framing: Framing) -> None:
    """As upstream allows (the session is keyed by address and roams), a client whose TCP
    connection broke continues the same session, streams and all, on a new connection."""
    async with (
        tcp_echo() as echo,
        server(tcp_rate_limit=0) as srv,
        tcp_tunnel(srv.addresses[0], KEY, framing) as t,
    ):
        sid = await t.open(f"127.0.0.1:{echo}")
        first = os.urandom(3 << 20)
        await t.write(sid, first)  # much of it, and of its echo, still in flight
        old_port = t.local_port
        (session,) = srv.sessions.values()
        await t.reconnect()
        second = os.urandom(1 << 20)
        await t.write(sid, second)
        got = await t.read(sid, len(first) + len(second))
        assert hashlib.sha256(got).digest() == hashlib.sha256(first + second).digest()
        assert list(srv.sessions.values()) == [session] and not session.closed
        assert session.addr == ("127.0.0.1", t.local_port, "tcp") and t.local_port != old_port
        assert srv.stats.roam_rebinds >= 1


async def test_udp_and_tcp_sessions_side_by_side() -> None:
    from .tunnel import tunnel

    async with tcp_echo() as echo, server() as srv:
        addr = srv.addresses[0]
        async with tunnel(addr, KEY) as u, tcp_tunnel(addr, KEY, Framing.WSS) as t:
            a = await u.open(f"127.0.0.1:{echo}")
            b = await t.open(f"127.0.0.1:{echo}")
            await u.write(a, b"over udp")
            await t.write(b, b"over tcp")
            assert await u.read(a, 8) == b"over udp"
            assert await t.read(b, 8) == b"over tcp"
            paths = sorted(s.listener.tcp is not None for s in srv.sessions.values())
            assert paths == [False, True]


# ---------------------------------------------------------------------------------- probes


def _probes() -> dict[str, bytes]:
    now = int(time.time())
    valid = reality_client().hello(now)
    return {
        "plain GET": b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
        "bad token": X.build_request(Framing.STREAM, SNI, make_token(b"wrong key", now)),
        "stale token": X.build_request(Framing.WSS, SNI, make_token(KEY, now - 3600)),
        "no token": b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n",
        "garbage": os.urandom(300),
        "browser hello": R.build_client_hello(SNI, os.urandom(32), os.urandom(32), os.urandom(32))
        + R.CCS_RECORD,
        "wrong sni": reality_client(sni="www.other.example").hello(now),
        "stale hello": reality_client().hello(now - 600),
        "replayed hello": valid,  # sent twice below: the second copy is a replay
    }


async def test_probes_get_the_real_sites_bytes() -> None:
    probes = _probes()
    async with (
        decoy() as (dest, seen),
        server(reality=reality_block(dest), tcp_rate_limit=0) as srv,
    ):
        port = tcp_port(srv)
        # the genuine hello is accepted once: the server's flight, no decoy
        async with await anyio.connect_tcp("127.0.0.1", port) as first:
            await first.send(probes["replayed hello"])
            got = b""
            with anyio.fail_after(10):
                while len(got) < len(R.SERVER_FLIGHT):
                    got += await first.receive()
            assert got == R.SERVER_FLIGHT
        for name, data in probes.items():
            answer = await exchange(port, data)
            # every byte the server had read reached the site, and the site's bytes came back
            assert answer == BANNER + data, name
        assert sorted(seen) == sorted(probes.values())
        assert srv.tcp is not None and srv.tcp.stats.forwarded == len(probes)
        assert srv.tcp.reality is not None
        assert srv.tcp.reality.stats.replay_drop == 1
        assert not srv.sessions


async def test_a_probe_that_stalls_is_handed_to_the_site() -> None:
    async with (
        decoy() as (dest, _),
        server(reality=reality_block(dest), tcp_handshake_timeout=0.5) as srv,
    ):
        async with await anyio.connect_tcp("127.0.0.1", tcp_port(srv)) as s:
            partial = b"GET /stream HTTP/1.1\r\nHost: x\r\n"
            await s.send(partial)  # and nothing more
            got = b""
            with anyio.fail_after(10):
                while len(got) < len(BANNER + partial):
                    got += await s.receive()
            assert got == BANNER + partial
        assert srv.tcp is not None and srv.tcp.stats.handshake_timeouts == 1


async def test_without_dest_http_gets_404_and_tls_is_closed() -> None:
    async with server(reality=reality_block(None)) as srv:
        port = tcp_port(srv)
        assert await exchange(port, b"GET / HTTP/1.1\r\n\r\n") == X.NOT_FOUND
        assert await exchange(port, b"\x00garbage") == X.NOT_FOUND
        token = make_token(b"bad", int(time.time()))
        assert await exchange(port, X.build_request(Framing.STREAM, SNI, token)) == X.NOT_FOUND
        hello = R.build_client_hello(SNI, os.urandom(32), os.urandom(32), os.urandom(32))
        assert await exchange(port, hello) == b""
    async with server() as srv:  # no Reality at all: TLS is closed unanswered, as upstream
        assert await exchange(tcp_port(srv), reality_client().hello(time.time())) == b""


async def test_client_sees_the_refusal() -> None:
    async with server() as srv:
        t = TcpTunnel(srv.addresses[0], "not the key", Framing.STREAM)
        with pytest.raises(RemoteProtocolError, match="404"):
            await t.open_transport()
        await t.aclose()


async def test_tcp_can_be_turned_off() -> None:
    async with server(tcp=False) as srv:
        assert srv.tcp is None
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", srv.addresses[0][1])


# ------------------------------------------------------------------------------ rate limit


async def test_rate_limit_per_ip() -> None:
    async with server(tcp_rate_limit=3, tcp_rate_window=600) as srv:
        port = tcp_port(srv)
        for _ in range(3):
            assert await exchange(port, b"GET / HTTP/1.1\r\n\r\n") == X.NOT_FOUND
        # the fourth from 127.0.0.1 within the window is closed before a byte is read
        assert await exchange(port, b"GET / HTTP/1.1\r\n\r\n") == b""
        # other addresses have their own budget
        assert await exchange(port, b"GET / HTTP/1.1\r\n\r\n", local_host="127.0.0.2") == (
            X.NOT_FOUND
        )
        assert srv.tcp is not None and srv.tcp.stats.rate_limited == 1


def test_rate_limiter_window() -> None:
    from ostp_server.tcp import ConnectionRateLimiter

    limiter = ConnectionRateLimiter(10, 10.0)
    assert all(limiter.allow("203.0.113.1", 0.0) for _ in range(10))
    assert not limiter.allow("203.0.113.1", 5.0)
    assert not limiter.allow("::ffff:203.0.113.1", 9.9)  # v4-mapped is the same client
    assert limiter.allow("203.0.113.2", 5.0)
    assert limiter.allow("203.0.113.1", 10.0)  # a new window
    assert ConnectionRateLimiter(0, 10.0).allow("203.0.113.1", 0.0)


# ------------------------------------------------------------- slow and misbehaving peers


async def test_stalled_garbage_and_silent_peers_do_not_block_others() -> None:
    async with tcp_echo() as echo, server(tcp_handshake_timeout=1.0, tcp_rate_limit=0) as srv:
        port = tcp_port(srv)
        addr = ("127.0.0.1", port)
        async with anyio.create_task_group() as tg:
            stalled = await anyio.connect_tcp(*addr)
            await stalled.send(b"GET /stream HTTP/1.1\r\n")  # never finishes
            silent = await anyio.connect_tcp(*addr)  # never sends a byte
            # an accepted peer that sends a frame header and then trickles garbage
            trickler = TcpTunnel(addr, KEY, Framing.STREAM)
            await trickler.open_transport()
            assert trickler.stream is not None
            await trickler.stream.send(b"\xff\xff" + os.urandom(100))

            async def trickle() -> None:
                assert trickler.stream is not None
                with anyio.move_on_after(3):
                    while True:
                        await trickler.stream.send(os.urandom(1))
                        await anyio.sleep(0.01)

            tg.start_soon(trickle)
            # a WebSocket peer that breaks the framing is cut off
            broken = TcpTunnel(addr, KEY, Framing.WSS)
            await broken.open_transport()
            assert broken.stream is not None
            await broken.stream.send(b"\xf2\x00")  # reserved bits
            # meanwhile a real client moves data
            async with tcp_tunnel(addr, KEY, Framing.STREAM) as t:
                sid = await t.open(f"127.0.0.1:{echo}")
                payload = os.urandom(2 << 20)
                await t.write(sid, payload)
                assert await t.read(sid, len(payload)) == payload
            # the stalled and silent openings end by the deadline; the broken one at once
            for peer in (stalled, silent, broken.stream):
                with anyio.fail_after(10):
                    try:
                        while await peer.receive():
                            pass
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass
                await peer.aclose()
            assert srv.tcp is not None
            assert srv.tcp.stats.handshake_timeouts == 2
            assert srv.tcp.stats.protocol_errors == 1
            tg.cancel_scope.cancel()
        await trickler.aclose()


@asynccontextmanager
async def firehose() -> AsyncIterator[int]:
    """A remote that sends 64 MiB to whoever connects."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            chunk = bytes(1 << 20)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                for _ in range(64):
                    await stream.send(chunk)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


async def test_a_client_that_stops_reading_holds_only_itself() -> None:
    """A session whose client reads nothing fills its own TCP connection; others go on."""
    async with tcp_echo() as echo, firehose() as hose, server(tcp_rate_limit=0) as srv:
        addr = srv.addresses[0]
        async with tcp_tunnel(addr, KEY, Framing.STREAM) as stuck:
            sid1 = await stuck.open(f"127.0.0.1:{hose}")
            stuck.pause()
            stuck_session = srv.session_at(("127.0.0.1", stuck.local_port, "tcp"))
            assert stuck_session is not None
            async with tcp_tunnel(addr, KEY, Framing.WSS) as t:
                sid2 = await t.open(f"127.0.0.1:{echo}")
                payload = os.urandom(4 << 20)
                await t.write(sid2, payload)
                assert await t.read(sid2, len(payload)) == payload
            # the stuck session is held back (the session or, with flow control, its stream
            # is not writable) but lives on
            conn = stuck_session.conn
            assert not stuck_session.closed
            assert not conn.writable or not conn.stream_writable(sid1)


async def test_a_taken_tcp_port_leaves_udp_serving(caplog: pytest.LogCaptureFixture) -> None:
    from .tunnel import tunnel

    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        async with tcp_echo() as echo, server(listen=f"127.0.0.1:{port}") as srv:
            assert srv.addresses == [("127.0.0.1", port)]
            assert srv.tcp is not None and srv.tcp.addresses == []
            assert "cannot listen on tcp" in caplog.text
            async with tunnel(srv.addresses[0], KEY) as u:
                sid = await u.open(f"127.0.0.1:{echo}")
                await u.write(sid, b"udp still works")
                assert await u.read(sid, 15) == b"udp still works"
    finally:
        blocker.close()
