"""Datagram framing over a byte stream: ``len:u16 || datagram`` and WebSocket frames (spec §10.6).

Both directions of both codecs, sans-IO: encoders return bytes, decoders are fed whatever the
stream delivered and return whole datagrams. Every buffer is bounded: a decoder holds at most one
partial frame, and a frame longer than its limit is a :class:`RemoteProtocolError` (the shell
closes the connection).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError

MAX_STREAM_DATAGRAM = 0xFFFF  # spec §10.6: the length prefix is a u16
WS_MAX_PAYLOAD = 1 << 17  # enough for any OSTP datagram (and upstream's 70,000-byte vector)

# RFC 6455 §5.2 opcodes
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_FIN = 0x80

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


# ------------------------------------------------------------------------------ len:u16


def encode_len_u16(datagram: bytes | bytearray | memoryview) -> bytes:
    """One datagram as ``len:u16 BE || datagram`` (upstream's UoT framing, spec §10.6)."""
    n = len(datagram)
    if n > MAX_STREAM_DATAGRAM:
        raise LocalProtocolError(f"a datagram of {n} bytes does not fit a u16 length")
    return _U16.pack(n) + bytes(datagram)


def encode_len_u16_many(datagrams: list[bytes]) -> bytes:
    """Several datagrams framed back to back (one write for a whole batch)."""
    parts: list[bytes] = []
    pack = _U16.pack
    for d in datagrams:
        n = len(d)
        if n > MAX_STREAM_DATAGRAM:
            raise LocalProtocolError(f"a datagram of {n} bytes does not fit a u16 length")
        parts.append(pack(n))
        parts.append(d)
    return b"".join(parts)


class LenU16Decoder:
    """Splits a byte stream into ``len:u16``-prefixed datagrams; holds at most one partial one.

    A frame trickling in a few bytes at a time costs amortised O(1) per byte: nothing is parsed
    again until the bytes the current frame needs have arrived.
    """

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 2

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Whole datagrams completed by ``data``, in order (a zero-length one included)."""
        buf = self._buf
        buf += data
        end = len(buf)
        if end < self._need:
            return []
        out: list[bytes] = []
        view = memoryview(buf)
        pos = 0
        need = 2
        try:
            while end - pos >= 2:
                n = (buf[pos] << 8) | buf[pos + 1]
                if end - pos - 2 < n:
                    need = n + 2
                    break
                out.append(bytes(view[pos + 2 : pos + 2 + n]))
                pos += 2 + n
        finally:
            view.release()
        if pos:
            del buf[:pos]
        self._need = need
        return out


# ------------------------------------------------------------------------------ WebSocket


def ws_mask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3); its own inverse."""
    n = len(payload)
    if not n:
        return b""
    reps = mask * ((n >> 2) + 1)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big")


def ws_header(
    length: int, *, opcode: int = OP_BINARY, masked: bool = False, fin: bool = True
) -> bytes:
    """Frame header up to (not including) the mask: 7-bit, 126+u16 or 127+u64 length."""
    b0 = (_FIN if fin else 0) | opcode
    m = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, m | length))
    if length <= 0xFFFF:
        return bytes((b0, m | 126)) + _U16.pack(length)
    return bytes((b0, m | 127)) + _U64.pack(length)


def encode_ws_frame(
    payload: bytes | bytearray | memoryview, *, mask: bytes | None = None, opcode: int = OP_BINARY
) -> bytes:
    """One final frame; ``mask`` (4 bytes) for the client → server direction (spec §10.6)."""
    if mask is None:
        return ws_header(len(payload), opcode=opcode) + bytes(payload)
    if len(mask) != 4:
        raise LocalProtocolError("a WebSocket mask is 4 bytes")
    return ws_header(len(payload), opcode=opcode, masked=True) + mask + ws_mask(payload, mask)


@dataclass(frozen=True, slots=True)
class WsControlReceived:
    """A control frame arrived (close, ping or pong); data frames are returned by ``feed``."""

    opcode: int
    payload: bytes


class WsDecoder:
    """Splits a byte stream into WebSocket messages.

    Data frames (binary, text, continuation) make datagrams: upstream sends each datagram as one
    final binary frame and ignores the opcode on receipt (spec §10.6); fragmented messages are
    joined (RFC 6455 §5.4). Control frames are queued as :class:`WsControlReceived` for the
    owner to answer. Masked and unmasked frames are both accepted, as upstream does.
    """

    __slots__ = ("_buf", "_control", "_fragments", "_fragments_len", "_need", "max_payload")

    def __init__(self, max_payload: int = WS_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._need = 2
        self._fragments: list[bytes] = []
        self._fragments_len = 0
        self._control: deque[WsControlReceived] = deque()

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._fragments_len

    def next_control(self) -> WsControlReceived | None:
        return self._control.popleft() if self._control else None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Whole data messages completed by ``data``; RemoteProtocolError on a bad frame."""
        buf = self._buf
        buf += data
        end = len(buf)
        if end < self._need:
            return []
        out: list[bytes] = []
        pos = 0
        need = 2
        limit = self.max_payload
        view = memoryview(buf)
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                if b0 & 0x70:
                    raise RemoteProtocolError("WebSocket frame with reserved bits set")
                n = b1 & 0x7F
                head = 2
                if n == 126:
                    if end - pos < 4:
                        need = 4
                        break
                    n = (buf[pos + 2] << 8) | buf[pos + 3]
                    head = 4
                elif n == 127:
                    if end - pos < 10:
                        need = 10
                        break
                    n = _U64.unpack_from(buf, pos + 2)[0]
                    head = 10
                if n > limit:
                    raise RemoteProtocolError(f"WebSocket frame of {n} bytes exceeds {limit}")
                masked = b1 & 0x80
                if masked:
                    head += 4
                if end - pos < head + n:
                    need = head + n
                    break
                start = pos + head
                if masked:
                    payload = ws_mask(view[start : start + n], bytes(view[start - 4 : start]))
                else:
                    payload = bytes(view[start : start + n])
                pos = start + n
                opcode = b0 & 0x0F
                fin = b0 & _FIN
                if opcode >= 0x8:
                    if not fin or n > 125:
                        raise RemoteProtocolError("invalid WebSocket control frame")
                    self._control.append(WsControlReceived(opcode, payload))
                    continue
                if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
                    raise RemoteProtocolError(f"WebSocket frame with unknown opcode {opcode:#x}")
                if fin and not self._fragments:
                    out.append(payload)  # the hot path: one final frame per datagram
                    continue
                self._fragments_len += n
                if self._fragments_len > limit:
                    raise RemoteProtocolError(f"fragmented WebSocket message exceeds {limit}")
                self._fragments.append(payload)
                if fin:
                    out.append(b"".join(self._fragments))
                    self._fragments = []
                    self._fragments_len = 0
        finally:
            view.release()
        if pos:
            del buf[:pos]
        self._need = need
        return out
