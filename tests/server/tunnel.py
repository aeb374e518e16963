"""A small OSTP client for the server tests: ``ClientConnection`` on a real UDP socket.

Two tasks, as in the server: one reads every datagram that is ready, one sleeps until the
core's timer (or until the test queued something). ``rebind()`` moves the client to a new
source port in the middle of whatever it is doing (roaming).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel

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
    UdpAssociate,
    UdpData,
)


@dataclass
class StreamState:
    received: bytearray = field(default_factory=bytearray)
    ok: bool = False
    error: str | None = None
    closed: bool = False
    datagrams: list[tuple[str, bytes]] = field(default_factory=list)


class Tunnel:
    def __init__(
        self,
        server: tuple[str, int],
        key: str,
        *,
        config: ConnectionConfig | None = None,
        unix_offset: float = 0.0,
    ) -> None:
        self.server = server
        self.conn = ClientConnection(access_key=key, config=config or ConnectionConfig())
        self.unix_offset = unix_offset
        self.sock = self._new_socket()
        self.streams: dict[int, StreamState] = {}
        self.terminated: str | None = None
        self.established = False
        self.first_datagrams: list[bytes] = []
        self._changed = anyio.Event()
        self._timer_wake = anyio.Event()
        self._next_stream = 1
        self._grant = False
        self.consume = True
        """Report received Data as consumed (False: a client whose reader has stopped)."""
        self._reader_scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    def _new_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.server[0], 0))
        sock.setblocking(False)
        return sock

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    # -- loop ----------------------------------------------------------------------------

    def flush(self) -> None:
        for d in self.conn.datagrams_to_send(time.monotonic()):
            if not self.established:
                self.first_datagrams.append(d)
            with suppress(BlockingIOError):
                self.sock.sendto(d, self.server)
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
        if self._grant:
            self._grant = False
            self.flush()

    def _on_message(self, stream_id: int, message: RelayMessage) -> None:
        st = self.streams.setdefault(stream_id, StreamState())
        if isinstance(message, Data):
            st.received += message.data
            # the test reads everything at once: credit for the server (flow control)
            if self.consume and self.conn.stream_consumed(stream_id, len(message.data)):
                self._grant = True
        elif isinstance(message, ConnectOk):
            st.ok = True
        elif isinstance(message, Error):
            st.error = message.message
        elif isinstance(message, Close):
            st.closed = True
        elif isinstance(message, UdpData):
            st.datagrams.append((message.address, message.data))

    async def _reader(
        self, sock: socket.socket, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with anyio.CancelScope() as scope:
            self._reader_scope = scope
            task_status.started()
            while True:
                await anyio.wait_readable(sock)
                now = time.monotonic()
                for _ in range(512):
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    self.conn.receive_datagram(data, now)
                self._drain()
                self.flush()

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

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._reader, self.sock)
            tg.start_soon(self._timer)
            self.conn.connect(time.monotonic(), time.time() + self.unix_offset)
            self.flush()
            task_status.started()

    def rebind(self) -> int:
        """Continue from a new source port; return it."""
        assert self._tg is not None and self._reader_scope is not None
        old = self.sock
        self._reader_scope.cancel()
        self.sock = self._new_socket()
        self._tg.start_soon(self._reader_after_close, old)
        return self.local_port

    def pause(self) -> None:
        """Stop reading the UDP socket (a client that does not keep up)."""
        assert self._reader_scope is not None
        self._reader_scope.cancel()

    def resume(self) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._reader_after_close, None)

    async def _reader_after_close(self, old: socket.socket | None) -> None:
        await anyio.lowlevel.checkpoint()
        if old is not None:
            old.close()
        await self._reader(self.sock, task_status=anyio.TASK_STATUS_IGNORED)

    # -- API for tests ----------------------------------------------------------------------

    async def wait(self, cond: Callable[[], bool], limit: float = 20.0) -> None:
        with anyio.fail_after(limit):
            while not cond():
                if self.terminated is not None:
                    raise AssertionError(f"tunnel terminated: {self.terminated}")
                await self._changed.wait()

    async def handshake(self, limit: float = 10.0) -> None:
        await self.wait(lambda: self.established, limit)

    def _new_stream(self) -> int:
        sid = self._next_stream
        self._next_stream += 1
        self.streams[sid] = StreamState()
        return sid

    async def open(self, target: str, *, expect_ok: bool = True) -> int:
        await self.handshake()
        sid = self._new_stream()
        self.conn.send(sid, Connect(target))
        self.flush()
        st = self.streams[sid]
        await self.wait(lambda: st.ok or st.error is not None)
        if expect_ok:
            assert st.ok, st.error
        return sid

    async def associate(self) -> int:
        await self.handshake()
        sid = self._new_stream()
        self.conn.send(sid, UdpAssociate())
        self.flush()
        st = self.streams[sid]
        await self.wait(lambda: st.ok)
        return sid

    async def write(self, stream_id: int, data: bytes, chunk: int = 65536) -> None:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            await self.wait(lambda: self.conn.stream_writable(stream_id), limit=30)
            self.conn.send_data(stream_id, view[start : start + chunk])
            self.flush()

    def send(self, stream_id: int, message: RelayMessage) -> None:
        self.conn.send(stream_id, message)
        self.flush()

    async def read(self, stream_id: int, n: int, limit: float = 30.0) -> bytes:
        st = self.streams[stream_id]
        await self.wait(lambda: len(st.received) >= n, limit)
        return bytes(st.received[:n])


@asynccontextmanager
async def tunnel(
    server: tuple[str, int],
    key: str,
    *,
    config: ConnectionConfig | None = None,
    unix_offset: float = 0.0,
) -> AsyncIterator[Tunnel]:
    t = Tunnel(server, key, config=config, unix_offset=unix_offset)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(t.run)
            try:
                yield t
            finally:
                tg.cancel_scope.cancel()
    finally:
        t.sock.close()
