"""Our server against an upstream-behaviour client that gives up on one of its frames.

Upstream's client (spec §7.2) stops re-sending a frame ~1.5 s after it first sent it. The
server then gives the hole up (DataLost) and must reset exactly the streams that may have lost
client data in it: those open before the hole that no Close had ended. A stream the client had
already finished (its Close came before the hole) keeps writing its last bytes to its remote,
and a stream opened after the hole works.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from ostp_proto import Close, Connect, ConnectOk, Data
from ostp_server.session import TcpRelay

from ..upstream.client import UpstreamTunnel, upstream_tunnel
from .helpers import KEY, poll_until, server, tcp_echo

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

CHUNK = 4096  # what upstream puts in one Data frame
SLOW_BODY = 8 << 20  # more than the kernel buffers between the relay and a stopped reader


class SlowSink:
    """A remote that reads nothing until ``release`` is set, then everything up to EOF."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.received = 0
        self.ending: str | None = None
        self.done = anyio.Event()


@asynccontextmanager
async def slow_sink() -> AsyncIterator[tuple[SlowSink, int]]:
    """A TCP listener with a tiny receive buffer whose one connection reads only when told."""
    sink = SlowSink()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    async def serve() -> None:
        await anyio.wait_readable(listener)
        conn, _ = listener.accept()
        conn.setblocking(False)
        with conn:
            await sink.release.wait()
            try:
                while True:
                    await anyio.wait_readable(conn)
                    try:
                        data = conn.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    if not data:
                        sink.ending = "FIN"
                        break
                    sink.received += len(data)
            except ConnectionResetError:
                sink.ending = "RST"
        sink.done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            yield sink, int(listener.getsockname()[1])
            tg.cancel_scope.cancel()
    finally:
        listener.close()


def connected(t: UpstreamTunnel, stream_id: int) -> bool:
    return any(isinstance(m, ConnectOk) for m in t.received(stream_id))


def closed(t: UpstreamTunnel, stream_id: int) -> bool:
    return any(isinstance(m, Close) for m in t.received(stream_id))


def echoed(t: UpstreamTunnel, stream_id: int) -> bytes:
    return b"".join(m.data for m in t.received(stream_id) if isinstance(m, Data))


async def test_a_frame_the_client_gives_up_resets_only_the_streams_open_before_it() -> None:
    # remote_buffer: the slow remote's backlog must not pause the session (that is another
    # way to lose frames with an upstream client)
    async with (
        server(remote_buffer=64 << 20) as srv,
        tcp_echo() as echo,
        slow_sink() as (sink, sink_port),
        upstream_tunnel(srv.addresses[0], KEY) as t,
    ):
        a, b, done, late = 1, 2, 3, 4
        for sid, port in ((a, echo), (b, echo), (done, sink_port)):
            t.send(sid, Connect(f"127.0.0.1:{port}"))
        await t.wait(lambda: all(connected(t, s) for s in (a, b, done)))
        # the finished stream: all its data and its Close go out before the hole
        body = bytes(range(256)) * (CHUNK // 256)
        for _ in range(SLOW_BODY // CHUNK):
            t.send(done, Data(body))
        t.send(done, Close())
        (session,) = srv.sessions.values()
        relay = session.relays[done]
        assert isinstance(relay, TcpRelay)
        await poll_until(lambda: done not in session.conn._stream_floor, 20)
        assert relay.pending_bytes > 0  # still writing to its remote
        # the hole: every transmission of the next frame (data of a) is lost
        machine = t.client.machine
        assert machine is not None
        t.client.faults.drop_nonces.add(machine.next_nonce)
        t.send(a, Data(b"lost"))
        t.send(a, Data(b"after the hole"))
        t.send(b, Data(b"after the hole"))
        t.send(late, Connect(f"127.0.0.1:{echo}"))  # opened after the hole
        await t.wait(lambda: closed(t, a) and closed(t, b), 20)
        assert session.stats.streams_reset == 2
        assert echoed(t, a) == echoed(t, b) == b""  # nothing after the hole reached a remote
        await t.wait(lambda: connected(t, late))
        t.send(late, Data(b"the stream opened after the hole works"))
        await t.wait(lambda: echoed(t, late) == b"the stream opened after the hole works")
        assert not closed(t, late)
        # the finished stream was left alone: its remote gets every byte, then a clean EOF
        sink.release.set()
        with anyio.fail_after(20):
            await sink.done.wait()
        assert (sink.received, sink.ending) == (SLOW_BODY, "FIN")
