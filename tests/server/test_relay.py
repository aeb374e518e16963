"""The server relays TCP and UDP for a real client over real loopback sockets (spec §8, §9.5)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket

import anyio
import anyio.abc
import pytest

from ostp_proto import Close, ConnectionConfig, UdpData

from .helpers import KEY, http_origin, poll_until, server, tcp_echo, udp_echo
from .tunnel import tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_tcp_echo_and_close() -> None:
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        await t.write(sid, b"hello, echo")
        assert await t.read(sid, 11) == b"hello, echo"
        t.send(sid, Close())
        session = next(iter(srv.sessions.values()))
        await poll_until(lambda: not session.relays)
        assert srv.key_stats[0].sessions == 1
        assert srv.key_stats[0].bytes_up > 0 and srv.key_stats[0].bytes_down > 0


async def test_http_origin_response_and_remote_close() -> None:
    async with server() as srv, http_origin() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        await t.write(sid, b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
        st = t.streams[sid]
        await t.wait(lambda: st.closed)  # the origin closes: Close reaches the client
        head, _, body = bytes(st.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == b"hello from the origin\n" * 1000


async def test_gateway_address_means_the_server_itself() -> None:
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"10.1.0.1:{port}")
        await t.write(sid, b"ping")
        assert await t.read(sid, 4) == b"ping"


async def test_connect_failure_is_an_error_message() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
    s.close()
    async with server() as srv, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{closed_port}", expect_ok=False)
        err = t.streams[sid].error
        # worded as upstream words it, so that clients map it to SOCKS5 reply 0x05
        refused = errno.ECONNREFUSED
        assert err == f"connect failed: {os.strerror(refused)} (os error {refused})"
        sid = await t.open("not an address", expect_ok=False)
        assert (t.streams[sid].error or "").startswith("connect failed: ")


async def test_data_before_connect_ok_is_dropped() -> None:
    async with server() as srv, tunnel(srv.addresses[0], KEY) as t:
        await t.handshake()
        await t.write(7, b"nobody is listening on stream 7")
        await poll_until(lambda: any(s.stats.remote_data_drop for s in srv.sessions.values()))


async def test_20_mb_byte_exact_both_ways() -> None:
    payload = os.urandom(20 * 1024 * 1024)
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.write, sid, payload)
            got = await t.read(sid, len(payload), limit=50)
        assert got == payload
        assert len(t.streams[sid].received) == len(payload)


async def test_100_streams_at_once() -> None:
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        await t.handshake()
        payloads: dict[int, bytes] = {}

        async def one(i: int) -> None:
            sid = await t.open(f"127.0.0.1:{port}")
            data = bytes([i]) * 10_000 + os.urandom(10_000)
            payloads[sid] = data
            await t.write(sid, data)
            assert await t.read(sid, len(data)) == data

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert len(payloads) == 100
        session = next(iter(srv.sessions.values()))
        assert session.stats.streams_opened == 100


async def test_udp_relay_round_trip() -> None:
    async with server() as srv, udp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.associate()
        st = t.streams[sid]
        for i in range(5):
            t.send(sid, UdpData(f"127.0.0.1:{port}", b"datagram %d" % i))
        t.send(sid, UdpData(f"10.1.0.1:{port}", b"via gateway"))
        await t.wait(lambda: len(st.datagrams) >= 6)
        assert {d for _, d in st.datagrams} == {b"echo:datagram %d" % i for i in range(5)} | {
            b"echo:via gateway"
        }
        assert {a for a, _ in st.datagrams} == {f"127.0.0.1:{port}"}
        t.send(sid, Close())
        session = next(iter(srv.sessions.values()))
        await poll_until(lambda: not session.relays)


async def test_udp_association_expires_when_idle() -> None:
    async with server(udp_idle_timeout=0.3) as srv, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.associate()
        await t.wait(lambda: t.streams[sid].closed, limit=10)
        assert not next(iter(srv.sessions.values())).relays


async def test_remote_data_for_unknown_association_is_dropped() -> None:
    async with server() as srv, udp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        await t.handshake()
        t.send(3, UdpData(f"127.0.0.1:{port}", b"x"))
        await poll_until(lambda: any(s.stats.udp_drop for s in srv.sessions.values()))


async def test_large_server_datagrams() -> None:
    payload = os.urandom(2 * 1024 * 1024)
    cfg = ConnectionConfig(max_datagram_size=4096)
    async with (
        server(max_datagram_size=4096) as srv,
        tcp_echo() as port,
        tunnel(srv.addresses[0], KEY, config=cfg) as t,
    ):
        sid = await t.open(f"127.0.0.1:{port}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.write, sid, payload)
            assert await t.read(sid, len(payload)) == payload


async def test_on_loopback_the_servers_datagrams_climb_to_64_kb() -> None:
    """Path MTU discovery on the server's side: datagrams start at 1,232 bytes and probes take
    them up to what loopback carries, so downloads keep their large datagrams (asserted on the
    session's state and on what the client received, not on speed)."""
    payload = os.urandom(8 * 1024 * 1024)
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        session = next(iter(srv.sessions.values()))
        await poll_until(lambda: session.conn.datagram_size >= 60_000, limit=30)
        pmtud = session.conn.pmtud
        assert pmtud is not None and pmtud.state.value == "search_complete"
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.write, sid, payload)
            assert await t.read(sid, len(payload), limit=50) == payload
        assert session.conn.datagram_size >= 60_000


@pytest.mark.parametrize("extensions", [True, False])
async def test_slow_remote_bounds_memory_then_stream_is_reset(extensions: bool) -> None:
    """A remote that never reads: queued bytes stay bounded; the stream is reset when stalled.

    With flow control the client stops at the stream's credit (the server's window); an
    upstream-like client is braked by refusing its Data once ``remote_buffer`` is queued.
    """
    ls = socket.create_server(("127.0.0.1", 0))
    # a small fixed receive buffer (no autotuning) so the kernel cannot absorb the test
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    ls.setblocking(False)
    port = ls.getsockname()[1]
    held: list[socket.socket] = []
    limit = 256 * 1024
    try:
        async with (
            server(remote_buffer=limit, stall_timeout=1.0) as srv,
            tunnel(srv.addresses[0], KEY, config=ConnectionConfig(extensions=extensions)) as t,
        ):
            connect = t.open(f"127.0.0.1:{port}")
            async with anyio.create_task_group() as tg:

                async def accept() -> None:
                    await anyio.wait_readable(ls)
                    held.append(ls.accept()[0])  # never read from

                tg.start_soon(accept)
                sid = await connect
            (session,) = srv.sessions.values()
            peak = 0
            excess = -(1 << 62)  # the stream's queue minus its receive window (flow control)

            async def push() -> None:
                with anyio.move_on_after(20):
                    while not t.streams[sid].closed:
                        await t.write(sid, b"z" * 65536)

            async def watch() -> None:
                nonlocal peak, excess
                while not t.streams[sid].closed:
                    peak = max(peak, session.remote_pending)
                    window = session.conn.stream_receive_window(sid)
                    if window is not None:
                        excess = max(excess, session.remote_pending - window)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as inner:
                inner.start_soon(push)
                inner.start_soon(watch)
            assert t.streams[sid].closed  # reset by the stall timeout
            assert session.stats.streams_reset == 1
            cfg = session.conn.config
            assert session.conn.flow_control == extensions
            if extensions:
                assert session.stats.backpressure_drop == 0
                assert session.conn.stats.flow_violation == 0
                assert excess <= 0 < peak  # never more than the window the server granted
            else:
                assert session.stats.backpressure_drop > 0
                # Overshoot is bounded by what the core may release at once when a gap is
                # filled: the reorder window (max_in_flight datagrams).
                assert peak < limit + cfg.max_in_flight * cfg.max_datagram_size
            assert session.remote_pending == 0
    finally:
        for s in held:
            s.close()
        ls.close()


async def test_slow_client_bounds_the_send_buffer() -> None:
    """A client that stops reading: the server stops reading the remote instead of queueing."""
    total = 30 * 1024 * 1024
    sent = 0

    async def source(stream: anyio.abc.SocketStream) -> None:
        nonlocal sent
        async with stream:
            await stream.receive(1)
            block = bytes(range(256)) * 256
            while sent < total:
                await stream.send(block)
                sent += len(block)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with (
        listener,
        anyio.create_task_group() as tg,
        server() as srv,
        tunnel(srv.addresses[0], KEY) as t,
    ):
        tg.start_soon(listener.serve, source)
        sid = await t.open(f"127.0.0.1:{port}")
        (session,) = srv.sessions.values()
        t.pause()
        await t.write(sid, b"g")
        await poll_until(lambda: sent > 0)
        # The client reads nothing, so the server's send buffer fills until the relay stops
        # reading the remote: the session is no longer writable or, with flow control, the
        # stream's credit and queue are used up. Wait for that state.
        conn = session.conn
        await poll_until(lambda: not conn.writable or not conn.stream_writable(sid), limit=60)
        held = session.conn.send_buffer_bytes
        assert held <= session.conn.config.send_buffer_limit + 65536
        assert sent < total  # the remote was throttled, not drained into memory
        t.resume()
        got = await t.read(sid, total, limit=40)
        assert got == (bytes(range(256)) * 256) * (total // 65536)
        tg.cancel_scope.cancel()


async def test_a_stall_reset_reaches_a_client_that_stopped_reading_the_stream() -> None:
    """The remote neither reads nor stops talking, the client neither reads this stream nor
    stops sending: the stall reset's Close must not wait behind data that waits for credit."""
    ls = socket.create_server(("127.0.0.1", 0))
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    ls.setblocking(False)
    port = ls.getsockname()[1]
    held: list[socket.socket] = []

    async def talk_without_listening() -> None:
        await anyio.wait_readable(ls)
        conn, _ = ls.accept()
        held.append(conn)
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                await anyio.wait_writable(conn)
                conn.send(b"r" * 65536)

    try:
        async with (
            server(stall_timeout=1.0) as srv,
            tunnel(srv.addresses[0], KEY) as t,
            anyio.create_task_group() as tg,
        ):
            t.consume = False  # the client's reader of this stream has stopped
            tg.start_soon(talk_without_listening)
            sid = await t.open(f"127.0.0.1:{port}")
            (session,) = srv.sessions.values()
            st = t.streams[sid]

            async def push() -> None:
                with anyio.move_on_after(20):
                    while not st.closed:
                        await t.write(sid, b"z" * 65536)

            tg.start_soon(push)
            await t.wait(lambda: st.closed, limit=20)  # reset by the stall timeout
            assert session.conn.flow_control and session.stats.streams_reset == 1
            assert len(st.received) <= t.conn.config.stream_window  # it never granted more
            tg.cancel_scope.cancel()
    finally:
        for s in held:
            s.close()
        ls.close()
