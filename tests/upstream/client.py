"""The upstream-behaviour client core on a real UDP socket, for tests of our server.

Two tasks, as upstream's client has: one reads every datagram that is ready, one ticks every
10 ms (retransmissions, keepalives). Messages from the server collect per stream; the test
sends relay messages with :meth:`UpstreamTunnel.send` and injects faults through
``client.faults`` (e.g. add ``client.machine.next_nonce`` to ``drop_nonces`` to lose the next
frame for good).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import anyio
import anyio.abc

from ostp_proto import RelayMessage

from .core import TICK, Faults, UpstreamClient


class UpstreamTunnel:
    def __init__(self, server: tuple[str, int], key: str) -> None:
        self.server = server
        self.client = UpstreamClient(
            key, unix_offset=time.time() - time.monotonic(), faults=Faults()
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((server[0], 0))
        self.sock.setblocking(False)
        self.messages: dict[int, list[RelayMessage]] = {}
        self._changed = anyio.Event()

    def flush(self) -> None:
        for datagram in self.client.datagrams_to_send():
            with suppress(OSError):  # a full buffer drops, as on the wire
                self.sock.sendto(datagram, self.server)
        inbox = self.client.inbox
        if inbox:
            for stream_id, message in inbox:
                self.messages.setdefault(stream_id, []).append(message)
            inbox.clear()
            self._changed.set()
            self._changed = anyio.Event()

    async def _reader(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            now = time.monotonic()
            for _ in range(512):
                try:
                    data = self.sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                self.client.receive_datagram(data, now)
            self.flush()

    async def _ticker(self) -> None:
        while True:
            now = time.monotonic()
            deadline = self.client.get_timer()
            if deadline is not None and deadline <= now:
                self.client.handle_timer(now)
                self.flush()
                continue
            await anyio.sleep(TICK if deadline is None else deadline - now)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reader)
            tg.start_soon(self._ticker)
            self.client.connect(time.monotonic())
            self.flush()
            task_status.started()

    def send(self, stream_id: int, message: RelayMessage) -> None:
        self.client.send(stream_id, message, time.monotonic())
        self.flush()

    def received(self, stream_id: int) -> list[RelayMessage]:
        return self.messages.get(stream_id, [])

    async def wait(self, cond: Callable[[], bool], limit: float = 20.0) -> None:
        with anyio.fail_after(limit):
            while not cond():
                await self._changed.wait()


@asynccontextmanager
async def upstream_tunnel(server: tuple[str, int], key: str) -> AsyncIterator[UpstreamTunnel]:
    t = UpstreamTunnel(server, key)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(t.run)
            await t.wait(lambda: t.client.established, 10)
            try:
                yield t
            finally:
                tg.cancel_scope.cancel()
    finally:
        t.sock.close()
