"""A small OSTP client over TCP for the server tests: the transport codecs of ostp_proto
(``StreamConnector`` + ``DatagramStream``) and a ``ClientConnection`` on a real TCP socket.

Same shape as ``tunnel.Tunnel``: one task reads the socket, one sleeps until the core's timer,
one writes what the core produced. ``reliable_transport`` is on, as a client over TCP runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from ostp_proto import (
    ClientConnection,
    Close,
    Connect,
    ConnectionConfig,
    ConnectionTerminated,
    ConnectOk,
    Data,
    Error,
    HandshakeCompleted,
    RelayMessage,
    RelayMessageReceived,
)
from ostp_proto.transport import (
    DatagramStream,
    Framing,
    RealityClient,
    StreamConnected,
    StreamConnector,
)

from .tunnel import StreamState


class TcpTunnel:
    def __init__(
        self,
        server: tuple[str, int],
        key: str,
        framing: Framing,
        *,
        reality: RealityClient | None = None,
        host: str = "www.example.com",
        local_host: str | None = None,
        config: ConnectionConfig | None = None,
    ) -> None:
        self.server = server
        self.key = key
        self.framing = framing
        self.reality = reality
        self.host = host
        self.local_host = local_host
        config = config or ConnectionConfig()
        self.conn = ClientConnection(
            access_key=key, config=dataclasses.replace(config, reliable_transport=True)
        )
        self.streams: dict[int, StreamState] = {}
        self.terminated: str | None = None
        self.established = False
        self.stream: anyio.abc.SocketStream | None = None
        self.codec: DatagramStream | None = None
        self.eof = False
        self._out = bytearray()
        self._out_ready = anyio.Event()
        self._changed = anyio.Event()
        self._timer_wake = anyio.Event()
        self._next_stream = 1
        self._reader_scope = anyio.CancelScope()
        self._io_scope = anyio.CancelScope()
        self._tg: anyio.abc.TaskGroup | None = None

    # -- loop ------------------------------------------------------------------------------

    def flush(self) -> None:
        out = self.conn.datagrams_to_send(time.monotonic())
        if out and self.codec is not None:
            self._out += self.codec.encode(out)
            self._out_ready.set()
        self._timer_wake.set()

    def _drain(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, HandshakeCompleted):
                self.established = True
            elif isinstance(ev, ConnectionTerminated):
                self.terminated = ev.reason
            elif isinstance(ev, RelayMessageReceived):
                self._on_message(ev.stream_id, ev.message)
        self._changed.set()
        self._changed = anyio.Event()

    def _on_message(self, stream_id: int, message: RelayMessage) -> None:
        st = self.streams.setdefault(stream_id, StreamState())
        if isinstance(message, Data):
            st.received += message.data
            # the test reads everything at once: credit for the server (flow control); the
            # WindowUpdate leaves with the flush that follows every feed
            self.conn.stream_consumed(stream_id, len(message.data))
        elif isinstance(message, ConnectOk):
            st.ok = True
        elif isinstance(message, Error):
            st.error = message.message
        elif isinstance(message, Close):
            st.closed = True

    def _feed(self, datagrams: list[bytes]) -> None:
        now = time.monotonic()
        for d in datagrams:
            self.conn.receive_datagram(d, now)
        self._drain()
        self.flush()

    async def _reader(self, stream: anyio.abc.SocketStream) -> None:
        codec = self.codec
        assert codec is not None
        with self._reader_scope:
            try:
                while True:
                    data = await stream.receive(65536)
                    self._feed(codec.receive(data))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.eof = True
                self._changed.set()

    async def _writer(self, stream: anyio.abc.SocketStream) -> None:
        while True:
            if not self._out:
                self._out_ready = anyio.Event()
                await self._out_ready.wait()
                continue
            data = bytes(self._out)
            self._out.clear()
            await stream.send(data)

    async def _io(self, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        with scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader, stream)
                await self._writer(stream)

    async def reconnect(self) -> None:
        """Drop the TCP connection and continue the same OSTP session on a new one."""
        assert self._tg is not None
        self._io_scope.cancel()
        await self.aclose()
        self._out.clear()  # whatever had not left is lost with the old connection
        self.eof = False
        connected = await self.open_transport()
        assert self.stream is not None
        self.codec = DatagramStream(self.framing, client=True, records=connected.reality)
        self._reader_scope = anyio.CancelScope()
        self._io_scope = anyio.CancelScope()
        self._tg.start_soon(self._io, self.stream, self._io_scope)
        self.conn.path_changed(time.monotonic())  # re-send what was in flight
        self._feed(self.codec.receive_plaintext(connected.leftover))

    async def _timer(self) -> None:
        while True:
            now = time.monotonic()
            t = self.conn.get_timer()
            if t is not None and t <= now:
                self.conn.handle_timer(now)
                self._drain()
                self.flush()
                continue
            self._timer_wake = anyio.Event()
            with anyio.move_on_after(1.0 if t is None else t - now):
                await self._timer_wake.wait()

    async def open_transport(self) -> StreamConnected:
        """Connect and run the opening; the server's answer (RemoteProtocolError if refused)."""
        self.stream = await anyio.connect_tcp(
            self.server[0], self.server[1], local_host=self.local_host
        )
        connector = StreamConnector(
            framing=self.framing, access_key=self.key, host=self.host, reality=self.reality
        )
        connector.start(time.time())
        await self.stream.send(connector.data_to_send())
        with anyio.fail_after(10):
            while True:
                data = await self.stream.receive(65536)
                connected = connector.receive(data)
                out = connector.data_to_send()
                if out:
                    await self.stream.send(out)
                if connected is not None:
                    return connected

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        connected = await self.open_transport()
        assert self.stream is not None
        self.codec = DatagramStream(self.framing, client=True, records=connected.reality)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._io, self.stream, self._io_scope)
            tg.start_soon(self._timer)
            self.conn.connect(time.monotonic(), time.time())
            leftover = self.codec.receive_plaintext(connected.leftover)
            self._feed(leftover)
            task_status.started()

    # -- API for tests ---------------------------------------------------------------------

    async def wait(self, cond: Callable[[], bool], limit: float = 30.0) -> None:
        with anyio.fail_after(limit):
            while not cond():
                if self.terminated is not None:
                    raise AssertionError(f"tunnel terminated: {self.terminated}")
                if self.eof:
                    raise AssertionError("the server closed the TCP connection")
                await self._changed.wait()

    async def open(self, target: str) -> int:
        await self.wait(lambda: self.established, 10)
        sid = self._next_stream
        self._next_stream += 1
        st = self.streams[sid] = StreamState()
        self.conn.send(sid, Connect(target))
        self.flush()
        await self.wait(lambda: st.ok or st.error is not None)
        assert st.ok, st.error
        return sid

    async def write(self, stream_id: int, data: bytes, chunk: int = 65536) -> None:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            await self.wait(lambda: self.conn.writable, limit=60)
            self.conn.send_data(stream_id, view[start : start + chunk])
            self.flush()

    async def read(self, stream_id: int, n: int, limit: float = 60.0) -> bytes:
        st = self.streams[stream_id]
        await self.wait(lambda: len(st.received) >= n, limit)
        return bytes(st.received[:n])

    @property
    def local_port(self) -> int:
        assert self.stream is not None
        return int(self.stream.extra(anyio.abc.SocketAttribute.local_port))

    def pause(self) -> None:
        """Stop reading the TCP connection for good (a client that does not keep up)."""
        self._reader_scope.cancel()

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


@asynccontextmanager
async def tcp_tunnel(
    server: tuple[str, int],
    key: str,
    framing: Framing,
    *,
    reality: RealityClient | None = None,
    local_host: str | None = None,
) -> AsyncIterator[TcpTunnel]:
    t = TcpTunnel(server, key, framing, reality=reality, local_host=local_host)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(t.run)
            try:
                yield t
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await t.aclose()
