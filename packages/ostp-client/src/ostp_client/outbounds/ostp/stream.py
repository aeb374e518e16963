"""The streams of an OSTP session: a TCP connection (:class:`OstpStream`) or a UDP association
(:class:`OstpUdpSession`) on one stream id, fed by the session's driving task and writing into
its core (flow control: docs/flow-control.md)."""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import anyio
import anyio.abc

from ostp_client.flow import (
    Address,
    ConnContext,
    GeneralFailure,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.outbounds.connect_errors import error_from_reason
from ostp_proto import (
    Close,
    ConnectOk,
    Data,
    Error,
    UdpData,
)


def _error_from_text(text: str) -> OutboundError:
    """Map the server's ``connect failed: <reason>`` text to an OutboundError (spec §9.5)."""
    return error_from_reason(text)


class SessionLink(Protocol):
    """What a stream needs of the session that carries it."""

    buffered: int
    """Bytes all streams of the session hold for their local readers."""

    def connect_answered(self) -> None: ...

    def unbind(self, stream_id: int) -> None: ...

    def consumed(self, stream_id: int, n: int) -> None: ...

    def send_message(self, stream_id: int, message: Any) -> None: ...

    async def send_data(self, stream_id: int, data: bytes) -> None: ...


class _Channel:
    """What a stream id is bound to inside a session: a TCP stream or a UDP association."""

    def __init__(self, session: SessionLink, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.connected = anyio.Event()
        self.error: OutboundError | None = None
        self.closed = False
        self.readable = anyio.Event()

    def on_message(self, message: object) -> None:
        raise NotImplementedError

    def reset(self, reason: str) -> None:
        raise NotImplementedError


class OstpStream(_Channel, anyio.abc.ByteStream):
    """A TCP connection through the tunnel (relay Connect/Data/Close on one stream id)."""

    def __init__(self, session: SessionLink, stream_id: int, ctx: ConnContext) -> None:
        super().__init__(session, stream_id)
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        """Bytes received for the local reader and not yet taken by it."""
        self._eof = False
        self._reset: str | None = None
        self.ctx = ctx

    # -- from the session --------------------------------------------------------------------

    def on_message(self, message: object) -> None:
        match message:
            case Data():
                if self._eof:
                    return
                self._chunks.append(message.data)
                self.buffered += len(message.data)
                self.session.buffered += len(message.data)
                self.connected.set()  # the first Data may race ahead of ConnectOk (spec §9.5)
                self.readable.set()
            case ConnectOk():
                self.connected.set()
                self.session.connect_answered()
            case Error():
                if not self.connected.is_set():
                    self.session.connect_answered()
                    self.error = _error_from_text(message.message)
                    self.connected.set()
                elif self._reset is None:
                    # not an orderly end (that is Close): the local side must see a reset
                    self._reset = f"the server reported an error: {message.message}"
                self._finish()
            case Close():
                self._finish()

    def _finish(self) -> None:
        self._eof = True
        self.readable.set()
        self.session.unbind(self.stream_id)

    def reset(self, reason: str) -> None:
        self._reset = reason
        if not self.connected.is_set():
            self.error = GeneralFailure(reason)
            self.connected.set()
        self._finish()

    # -- ByteStream ------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._reset is not None:
                    raise anyio.BrokenResourceError(self._reset)
                raise anyio.EndOfStream
            if self.closed:
                raise anyio.ClosedResourceError
            self.readable = anyio.Event()
            await self.readable.wait()
        # Hand over everything queued at once (up to max_bytes): one local write per batch of
        # datagrams instead of one per relay message.
        chunks = self._chunks
        chunk = chunks.popleft()
        if chunks and len(chunk) < max_bytes:
            parts = [chunk]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                nxt = chunks.popleft()
                parts.append(nxt)
                size += len(nxt)
            chunk = b"".join(parts)
        if len(chunk) > max_bytes:
            chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        self.session.consumed(self.stream_id, len(chunk))
        return chunk

    async def send(self, item: bytes) -> None:
        if self.closed or self._eof:
            raise anyio.ClosedResourceError if self.closed else anyio.BrokenResourceError
        await self.session.send_data(self.stream_id, item)

    async def send_eof(self) -> None:
        # OSTP has no half-close: Close ends the remote connection both ways (spec §8).
        self._close_remote()

    def _close_remote(self) -> None:
        if not self._eof:
            self._eof = True
            self.session.send_message(self.stream_id, Close())
            self.session.unbind(self.stream_id)
            self.readable.set()  # nothing comes after Close: a waiting receive() ends now

    async def aclose(self) -> None:
        if self.closed:
            return
        self._close_remote()
        self.closed = True
        self.session.buffered -= self.buffered
        self.buffered = 0
        self._chunks.clear()
        self.readable.set()


class OstpUdpSession(_Channel, UdpOutboundSession):
    """A UDP association through the tunnel (relay UdpAssociate/UdpData on one stream id)."""

    QUEUE_LIMIT = 256

    def __init__(self, session: SessionLink, stream_id: int) -> None:
        super().__init__(session, stream_id)
        self._queue: deque[tuple[Address, bytes]] = deque()
        self._ended = False

    def on_message(self, message: object) -> None:
        match message:
            case UdpData():
                if len(self._queue) >= self.QUEUE_LIMIT:
                    return  # UDP: drop rather than grow
                try:
                    source = Address.parse(message.address)
                except ValueError:
                    return
                self._queue.append((source, message.data))
                self.readable.set()
            case ConnectOk():
                self.connected.set()
            case Close() | Error():
                self.reset("association closed by the server")

    def reset(self, reason: str) -> None:
        self._ended = True
        self.connected.set()
        self.readable.set()
        self.session.unbind(self.stream_id)

    async def send_to(self, target: Address, data: bytes) -> None:
        if self._ended or self.closed:
            raise GeneralFailure("UDP association is closed")
        self.session.send_message(self.stream_id, UdpData(str(target), data))

    async def receive(self) -> tuple[Address, bytes]:
        while not self._queue:
            if self._ended or self.closed:
                raise anyio.EndOfStream
            self.readable = anyio.Event()
            await self.readable.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._ended:
            self.session.send_message(self.stream_id, Close())
        self.reset("closed")
