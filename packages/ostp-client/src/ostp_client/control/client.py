"""A small asyncio client of the control socket (used by `ostp-client ctl` and `ostp-tui`).

Depends only on asyncio and `control.protocol`, so it can be imported without the daemon.

    async with await ControlClient.connect(path) as client:
        status = await client.status()
        sub = await client.subscribe("logs", backlog=50)
        async for event in client.events():
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import sys
import threading
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import BaseModel

from ostp_client.control import pipes
from ostp_client.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    ActionResult,
    ConnectionList,
    DaemonStatus,
    DelayResult,
    Event,
    Hello,
    LogBatch,
    ProtocolError,
    ReloadResult,
    Request,
    Response,
    RouteTable,
    SubscribeResult,
    default_socket_path,
    encode,
    parse_server_message,
)
from ostp_client.errors import OstpClientError

__all__ = [
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "PipeTransport",
    "open_pipe_streams",
]

M = TypeVar("M", bound=BaseModel)

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 15.0


class ControlError(OstpClientError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlConnectionError(OstpClientError, ConnectionError):
    """No daemon at the socket, or the connection dropped."""


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The one place that knows the transport: a Unix socket, or a named pipe on Windows."""
    if sys.platform == "win32" or pipes.is_pipe_path(path):
        return await open_pipe_streams(path)
    return await asyncio.open_unix_connection(path, limit=MAX_LINE)


PIPE_READ_SIZE = 65536
PIPE_WRITE_HIGH = 1 << 16
"""Bytes queued for the pipe before `drain()` waits (asyncio's usual high-water mark)."""


async def open_pipe_streams(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a named pipe (`control.pipes.connect_pipe`), any event loop."""
    loop = asyncio.get_running_loop()
    connection = await loop.run_in_executor(None, pipes.connect_pipe, path, CONNECT_TIMEOUT)
    reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = PipeTransport(connection, protocol, loop)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class PipeTransport(asyncio.Transport):
    """An asyncio transport over a blocking `PipeConnection`: one thread reads, one writes.

    Not asyncio's own pipe transport (Proactor only, and its client cannot check who owns the
    pipe); this one runs with any loop and over the tests' in-memory pipes as well.
    """

    def __init__(
        self,
        connection: pipes.PipeConnection,
        protocol: asyncio.Protocol,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__()
        self._connection = connection
        self._protocol = protocol
        self._loop = loop
        self._closing = False
        self._lost = False
        self._queued = 0
        self._writing_paused = False
        self._reading = threading.Event()
        self._reading.set()
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        protocol.connection_made(self)
        for target, name in ((self._read_loop, "reader"), (self._write_loop, "writer")):
            threading.Thread(target=target, name=f"control pipe {name}", daemon=True).start()

    def _soon(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(callback, *args)

    # threads

    def _read_loop(self) -> None:
        error: Exception | None = None
        while True:
            self._reading.wait()
            try:
                data = self._connection.read(PIPE_READ_SIZE)
            except OSError as exc:
                data, error = b"", exc
            if not data:
                self._soon(self._ended, error)
                return
            self._soon(self._received, data)

    def _write_loop(self) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                self._connection.write(data)
            except OSError as exc:
                self._connection.cancel()
                self._soon(self._lose, exc)
                break
            self._soon(self._written, len(data))
        self._connection.close()
        self._soon(self._lose, None)

    # on the loop

    def _received(self, data: bytes) -> None:
        if not self._closing:
            self._protocol.data_received(data)

    def _ended(self, error: Exception | None) -> None:
        if not self._closing and error is None:
            self._protocol.eof_received()
        self._lose(error)

    def _written(self, size: int) -> None:
        self._queued -= size
        if self._writing_paused and self._queued <= PIPE_WRITE_HIGH // 4:
            self._writing_paused = False
            self._protocol.resume_writing()

    def _lose(self, error: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._closing = True
            self._outgoing.put(None)
            self._protocol.connection_lost(error)

    # asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._queued += len(data)
        self._outgoing.put(bytes(data))
        if not self._writing_paused and self._queued > PIPE_WRITE_HIGH:
            self._writing_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def close(self) -> None:
        """Stop at once: pending I/O is cancelled, the writer thread releases the pipe."""
        if self._closing:
            return
        self._closing = True
        self._connection.cancel()
        self._reading.set()
        self._outgoing.put(None)

    def abort(self) -> None:
        self.close()


class ControlClient:
    """One connection to the daemon. Not reusable after `aclose()` or a dropped socket."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello, path: str
    ) -> None:
        self.path = path
        self.hello = hello
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int | str, asyncio.Future[Response]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed: BaseException | None = None
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | None = None) -> Self:
        """Connect and check the protocol version; raises ControlConnectionError."""
        path = path or default_socket_path()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await _open(path)
                line = await reader.readline()
        except (OSError, TimeoutError, ValueError) as exc:
            raise ControlConnectionError(f"cannot connect to {path}: {exc}") from None
        try:
            hello = parse_server_message(line)
        except ProtocolError as exc:
            writer.close()
            raise ControlConnectionError(f"{path}: not an ostp-client control socket") from exc
        if not isinstance(hello, Hello) or hello.protocol != PROTOCOL_VERSION:
            writer.close()
            got = hello.protocol if isinstance(hello, Hello) else "?"
            raise ControlConnectionError(
                f"{path}: protocol version {got}, this client speaks {PROTOCOL_VERSION}"
            )
        return cls(reader, writer, hello, path)

    @property
    def connected(self) -> bool:
        return self._closed is None

    async def _read_loop(self) -> None:
        error: BaseException = ControlConnectionError(f"{self.path}: connection closed")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    message = parse_server_message(line)
                except ProtocolError:
                    continue  # newer daemon, unknown message type: ignore
                if isinstance(message, Response):
                    future = self._pending.pop(message.id, None) if message.id is not None else None
                    if future is not None and not future.done():
                        future.set_result(message)
                elif isinstance(message, Event):
                    self._events.put_nowait(message)
        except (OSError, ValueError) as exc:
            error = ControlConnectionError(f"{self.path}: {exc}")
        finally:
            self._closed = error
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            self._events.put_nowait(None)

    async def call(self, method: str, **params: Any) -> Any:
        """Send a request and return its `result` (JSON); raises ControlError on an error."""
        if self._closed is not None:
            raise ControlConnectionError(str(self._closed))
        request_id = next(self._ids)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(encode(Request(id=request_id, method=method, params=params)))
            await self._writer.drain()
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await future
        except (OSError, TimeoutError) as exc:
            raise ControlConnectionError(f"{self.path}: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
        if not response.ok:
            error = response.error
            raise ControlError(error.code if error else "error", error.message if error else "")
        return response.result

    async def _typed(self, model: type[M], method: str, **params: Any) -> M:
        return model.model_validate(await self.call(method, **params))

    async def status(self) -> DaemonStatus:
        return await self._typed(DaemonStatus, "status")

    async def connections(self) -> ConnectionList:
        return await self._typed(ConnectionList, "connections")

    async def routes(self) -> RouteTable:
        return await self._typed(RouteTable, "routes")

    async def logs(self, limit: int = 200, level: str = "debug", after: int = 0) -> LogBatch:
        return await self._typed(LogBatch, "logs", limit=limit, level=level, after=after)

    async def reconnect(self, outbound: str) -> ActionResult:
        return await self._typed(ActionResult, "reconnect", outbound=outbound)

    async def select(self, group: str, outbound: str) -> ActionResult:
        """Choose the member of a selector group (kept across daemon restarts)."""
        return await self._typed(ActionResult, "select", group=group, outbound=outbound)

    async def delay(self, outbound: str, url: str | None = None) -> DelayResult:
        """Check an outbound (a group: every member) now through `url` (default: its group's)."""
        params = {} if url is None else {"url": url}
        return await self._typed(DelayResult, "delay", outbound=outbound, **params)

    async def close_connection(self, conn_id: int) -> ActionResult:
        return await self._typed(ActionResult, "close_connection", id=conn_id)

    async def reload(self, path: str | None = None) -> ReloadResult:
        params = {} if path is None else {"path": path}
        return await self._typed(ReloadResult, "reload", **params)

    async def subscribe(self, topic: str, **params: Any) -> SubscribeResult:
        """Start a stream; its events arrive through `events()`."""
        return await self._typed(SubscribeResult, "subscribe", topic=topic, **params)

    async def unsubscribe(self, subscription: int | str) -> ActionResult:
        return await self._typed(ActionResult, "unsubscribe", subscription=subscription)

    async def events(self) -> AsyncIterator[Event]:
        """Subscription events in arrival order; raises ControlConnectionError on a drop."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # wake other readers too
                raise ControlConnectionError(str(self._closed))
            yield event

    async def aclose(self) -> None:
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._read_task
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
