"""OSTP datagrams over one TCP connection: the opening exchange and the framed data (spec §10.6).

Three sans-IO pieces, used by the server's TCP listener and meant for the client's ``tcp`` /
``wss`` transports as they are:

* :class:`StreamAcceptor` (server): fed the first bytes of a connection, decides between a
  ``/stream`` or ``/wss`` request with a valid token, a Reality hello of ours (then the inner
  request), or anything else, which it hands back whole (every byte read so far) for the shell
  to forward to the real site or answer with a 404.
* :class:`StreamConnector` (client): the request (inside Reality when configured) and the
  server's answer.
* :class:`DatagramStream` (both roles, after the opening): datagrams to wire bytes and back,
  ``len:u16`` or WebSocket framing, optionally inside Reality records.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import LocalProtocolError, RemoteProtocolError
from .framing import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    LenU16Decoder,
    WsDecoder,
    encode_len_u16_many,
    encode_ws_frame,
    ws_header,
)
from .reality import (
    CONTENT_HANDSHAKE,
    MAX_RECORD_BODY,
    RECORD_HEADER,
    RealityAcceptor,
    RealityClient,
    RealityServerSession,
    record_length,
)
from .xhttp import (
    NOT_FOUND,
    Framing,
    build_request,
    looks_like_request,
    make_token,
    parse_request,
    parse_response,
    response_for,
    verify_token,
)

RandomBytes = Callable[[int], bytes]

MAX_FIRST_FLIGHT = RECORD_HEADER + MAX_RECORD_BODY  # a whole ClientHello record, or a head


class RecordLayer(Protocol):
    """Reality's record layer as either role sees it."""

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]: ...

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes: ...


# ------------------------------------------------------------------------------ server


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """An OSTP client: send :attr:`StreamAcceptor.data_to_send`, then run a DatagramStream."""

    framing: Framing
    reality: RealityServerSession | None
    key_index: int | None
    """The access key the bearer token carried (None inside Reality: not checked, spec §10.6)."""
    leftover: bytes
    """Framed bytes (plaintext) that arrived right after the request head."""


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Not one of ours. Forward :attr:`received` to the real site, or refuse."""

    reason: str
    received: bytes
    """Every byte read from the peer so far, for the real site to see them all."""
    tls: bool
    """It looked like TLS (upstream answers those with nothing when it has no ``dest``)."""
    forwardable: bool
    """False once the server has spoken (after the Reality flight): only closing is left."""

    @property
    def answer(self) -> bytes:
        """What to send before closing when there is nowhere to forward to (spec §10.6)."""
        return b"" if self.tls or not self.forwardable else NOT_FOUND


class _Phase(enum.Enum):
    FIRST = 1
    INNER = 2
    DONE = 3


class StreamAcceptor:
    """The server's side of the opening of one TCP connection.

    Feed bytes with :meth:`receive` until it returns a :class:`StreamAccepted` or a
    :class:`StreamRefused`; after each call send :meth:`data_to_send`. At most
    :data:`MAX_FIRST_FLIGHT` bytes are buffered before a verdict.
    """

    def __init__(self, keys: Sequence[bytes], reality: RealityAcceptor | None = None) -> None:
        self._keys = list(keys)
        self._reality = reality
        self._buf = bytearray()
        self._phase = _Phase.FIRST
        self._session: RealityServerSession | None = None
        self._inner = bytearray()
        self._out = bytearray()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(
        self, data: bytes | bytearray | memoryview, unix_now: float
    ) -> StreamAccepted | StreamRefused | None:
        """A verdict, or None while more bytes are needed."""
        if self._phase is _Phase.DONE:
            raise LocalProtocolError("the opening is decided")
        if self._phase is _Phase.INNER:
            return self._receive_inner(data)
        buf = self._buf
        buf += data
        if not buf:
            return None
        if buf[0] == CONTENT_HANDSHAKE and (len(buf) < 2 or buf[1] == 0x03):
            return self._receive_tls(unix_now)
        return self._receive_http(unix_now)

    @property
    def received(self) -> int:
        """Bytes read from the peer so far."""
        return len(self._buf)

    def timed_out(self) -> StreamRefused:
        """The verdict when the peer stalls before one was reached."""
        return self._refuse("no complete request in time", tls=self._looks_tls())

    def _looks_tls(self) -> bool:
        return bool(self._buf) and self._buf[0] == CONTENT_HANDSHAKE

    def _refuse(self, reason: str, *, tls: bool) -> StreamRefused:
        forwardable = self._phase is _Phase.FIRST
        self._phase = _Phase.DONE
        return StreamRefused(reason, bytes(self._buf), tls, forwardable)

    def _receive_http(self, unix_now: float) -> StreamAccepted | StreamRefused | None:
        buf = self._buf
        if not looks_like_request(buf):
            return self._refuse("not an OSTP request", tls=False)
        try:
            head = parse_request(buf)
        except RemoteProtocolError as e:
            return self._refuse(str(e), tls=False)
        if head is None:
            return None
        if head.token is None:
            return self._refuse("no bearer token", tls=False)
        index = verify_token(head.token, self._keys, unix_now)
        if index is None:
            return self._refuse("bearer token invalid, stale or of no configured key", tls=False)
        self._phase = _Phase.DONE
        self._out += response_for(head.framing)
        leftover = bytes(buf[head.length :])
        return StreamAccepted(head.framing, None, index, leftover)

    def _receive_tls(self, unix_now: float) -> StreamAccepted | StreamRefused | None:
        buf = self._buf
        total = record_length(buf)
        if total is None:
            return None
        if total > MAX_FIRST_FLIGHT:
            return self._refuse("TLS record too large", tls=True)
        if len(buf) < total:
            return None
        if self._reality is None:
            return self._refuse("TLS without Reality configured", tls=True)
        session = self._reality.accept(bytes(buf[:total]), unix_now)
        if session is None:
            return self._refuse("not a Reality hello of ours", tls=True)
        self._session = session
        self._phase = _Phase.INNER
        self._out += session.flight
        return self._open_inner(bytes(buf[total:]))

    def _receive_inner(
        self, data: bytes | bytearray | memoryview
    ) -> StreamAccepted | StreamRefused | None:
        self._buf += data  # kept for the log; never forwarded once we have spoken
        return self._open_inner(data)

    def _open_inner(
        self, data: bytes | bytearray | memoryview
    ) -> StreamAccepted | StreamRefused | None:
        session = self._session
        assert session is not None
        if len(self._buf) > 4 * MAX_FIRST_FLIGHT:
            return self._refuse("inner request too large", tls=True)
        try:
            for plain in session.receive(data):
                self._inner += plain
        except RemoteProtocolError as e:
            return self._refuse(f"inner stream: {e}", tls=True)
        inner = self._inner
        if not inner:
            return None
        if not looks_like_request(inner):
            return self._refuse("inner request is not /stream or /wss", tls=True)
        try:
            head = parse_request(inner)
        except RemoteProtocolError as e:
            return self._refuse(f"inner request: {e}", tls=True)
        if head is None:
            return None
        # spec §10.6: inside Reality the token is not checked (the hello authenticated)
        self._phase = _Phase.DONE
        self._out += session.seal(response_for(head.framing))
        return StreamAccepted(head.framing, session, None, bytes(inner[head.length :]))


# ------------------------------------------------------------------------------ client


@dataclass(frozen=True, slots=True)
class StreamConnected:
    """The server accepted: run a DatagramStream with :attr:`leftover` fed first."""

    framing: Framing
    reality: RealityClient | None
    leftover: bytes


class StreamConnector:
    """The client's side of the opening: :meth:`start`, then feed :meth:`receive`.

    Without Reality the request goes out at once; with Reality the ClientHello and CCS go
    first and the request follows the server's flight, as upstream's client does.
    """

    def __init__(
        self,
        *,
        framing: Framing,
        access_key: str | bytes,
        host: str,
        reality: RealityClient | None = None,
    ) -> None:
        self.framing = framing
        self._key = access_key
        self._host = host
        self._reality = reality
        self._out = bytearray()
        self._request = b""
        self._buf = bytearray()
        self._started = False
        self._sent_request = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def start(self, unix_now: float) -> None:
        if self._started:
            raise LocalProtocolError("start() may be called once")
        self._started = True
        self._request = build_request(
            self.framing, self._host, make_token(self._key, int(unix_now))
        )
        if self._reality is None:
            self._out += self._request
            self._sent_request = True
        else:
            self._out += self._reality.hello(unix_now)

    def receive(self, data: bytes | bytearray | memoryview) -> StreamConnected | None:
        """The verdict once the response head is complete; RemoteProtocolError on refusal."""
        if not self._started:
            raise LocalProtocolError("start() first")
        reality = self._reality
        if reality is not None:
            for plain in reality.receive(data):
                self._buf += plain
            if reality.flight_received and not self._sent_request:
                self._out += reality.seal(self._request)
                self._sent_request = True
        else:
            self._buf += data
        if not self._buf:
            return None
        length = parse_response(self._buf, self.framing)
        if length is None:
            return None
        return StreamConnected(self.framing, reality, bytes(self._buf[length:]))


# ------------------------------------------------------------------------------ data


class DatagramStream:
    """Datagrams over the accepted connection, either role.

    :meth:`encode` turns a batch of datagrams into wire bytes (one write); :meth:`receive`
    turns wire bytes into datagrams. For WebSocket, client frames are masked with a fresh
    4-byte key (drawn from a pool, not one system call per frame), a ping is answered with a
    pong and a close with a close (then :attr:`closed`); the answers wait in
    :meth:`data_to_send`.
    """

    def __init__(
        self,
        framing: Framing,
        *,
        client: bool,
        records: RecordLayer | None = None,
        random_bytes: RandomBytes = os.urandom,
        max_ws_payload: int | None = None,
    ) -> None:
        self.framing = framing
        self.client = client
        self._records = records
        self._random = random_bytes
        self._pool = b""
        self._len16 = LenU16Decoder() if framing is Framing.STREAM else None
        self._ws = (
            None
            if framing is Framing.STREAM
            else (WsDecoder() if max_ws_payload is None else WsDecoder(max_ws_payload))
        )
        self._out = bytearray()
        self.closed = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _mask(self) -> bytes:
        pool = self._pool
        if len(pool) < 4:
            pool = self._random(4096)
        self._pool = pool[4:]
        return pool[:4]

    def frame(self, datagrams: list[bytes]) -> bytes:
        """The datagrams framed (plaintext, before any record layer)."""
        if self._len16 is not None:
            return encode_len_u16_many(datagrams)
        if not self.client:
            parts: list[bytes] = []
            for d in datagrams:
                parts.append(ws_header(len(d)))
                parts.append(d)
            return b"".join(parts)
        return b"".join(encode_ws_frame(d, mask=self._mask()) for d in datagrams)

    def encode(self, datagrams: list[bytes]) -> bytes:
        """Wire bytes for ``datagrams`` (LocalProtocolError if one exceeds a u16 length)."""
        framed = self.frame(datagrams)
        return self._records.seal(framed) if self._records is not None else framed

    def _control(self, opcode: int, payload: bytes) -> bytes:
        if self.client:
            return encode_ws_frame(payload, mask=self._mask(), opcode=opcode)
        return encode_ws_frame(payload, opcode=opcode)

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Datagrams completed by ``data``; RemoteProtocolError: close the connection."""
        records = self._records
        if records is None:
            return self.receive_plaintext(data)
        chunks = records.receive(data)
        if not chunks:
            return []
        return self.receive_plaintext(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def receive_plaintext(self, plain: bytes | bytearray | memoryview) -> list[bytes]:
        """Like :meth:`receive` for bytes already out of the record layer (the opening's
        leftover)."""
        if self._len16 is not None:
            return self._len16.feed(plain)
        ws = self._ws
        assert ws is not None
        out = ws.feed(plain)
        while (ev := ws.next_control()) is not None:
            if ev.opcode == OP_PING:
                self._reply(self._control(OP_PONG, ev.payload))
            elif ev.opcode == OP_CLOSE and not self.closed:
                self.closed = True
                self._reply(self._control(OP_CLOSE, ev.payload[:2]))
        return out

    def _reply(self, framed: bytes) -> None:
        self._out += self._records.seal(framed) if self._records is not None else framed
