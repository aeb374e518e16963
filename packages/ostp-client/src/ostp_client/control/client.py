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
import sys
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import BaseModel

from ostp_client.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    ActionResult,
    ConnectionList,
    DaemonStatus,
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

__all__ = ["ControlClient", "ControlConnectionError", "ControlError"]

M = TypeVar("M", bound=BaseModel)

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 15.0


class ControlError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlConnectionError(ConnectionError):
    """No daemon at the socket, or the connection dropped."""


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The one place that knows the transport: a Unix socket, or a named pipe on Windows."""
    if sys.platform == "win32":  # pragma: no cover - not tested on this platform
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_pipe_connection(  # type: ignore[attr-defined]
            lambda: protocol, path
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer
    return await asyncio.open_unix_connection(path, limit=MAX_LINE)


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
