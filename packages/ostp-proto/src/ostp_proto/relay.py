"""Relay messages: the payload of every Data frame (spec §8).

Besides upstream's ten messages this module holds ostp-py's extension (docs/flow-control.md):
an extension hello carried as a trailer after a KeepAlive (spec §8: decoders ignore bytes after
a message's fields, and KeepAlive has none), and WindowUpdate, a message sent only to a peer
that answered the hello.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TypeAlias

from .errors import RemoteProtocolError

MAX_FIELD = 0xFFFF


class RelayTag(enum.IntEnum):
    CONNECT = 1
    DATA = 2
    KEEPALIVE = 3
    CLOSE = 4
    CONNECT_OK = 5
    ERROR = 6
    PING = 7
    PONG = 8
    UDP_ASSOCIATE = 9
    UDP_DATA = 10
    WINDOW_UPDATE = 0x40
    """ostp-py extension, only towards a peer that negotiated it. Upstream uses 1-10; 0x40
    leaves 11-63 free for upstream's own growth, so the two cannot collide for a long time."""
    ABANDONED = 0x41
    """ostp-py extension (path MTU probes), only towards a peer that negotiated it."""


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a TCP connection to ``address`` (``host:port``, IPv6 in brackets)."""

    address: str


@dataclass(frozen=True, slots=True)
class Data:
    """Stream bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    pass


@dataclass(frozen=True, slots=True)
class ConnectOk:
    pass


@dataclass(frozen=True, slots=True)
class Error:
    message: str


@dataclass(frozen=True, slots=True)
class Ping:
    """``timestamp``: milliseconds since the Unix epoch (spec §8)."""

    timestamp: int


@dataclass(frozen=True, slots=True)
class Pong:
    timestamp: int


@dataclass(frozen=True, slots=True)
class UdpAssociate:
    pass


@dataclass(frozen=True, slots=True)
class UdpData:
    address: str
    data: bytes


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    """Extension: the sender of this message accepts stream bytes up to ``max_offset``.

    An absolute offset (QUIC's MAX_STREAM_DATA): repeating or reordering updates is harmless,
    a smaller value than one already received changes nothing.
    """

    max_offset: int


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Extension: the sender gave up the datagram it sent under ``nonce`` (a lost path MTU
    probe, which carried no stream data). The receiver counts that nonce as received with no
    frame, so the hole it left closes without any data being reported lost."""

    nonce: int


RelayMessage: TypeAlias = (
    Connect
    | Data
    | KeepAlive
    | Close
    | ConnectOk
    | Error
    | Ping
    | Pong
    | UdpAssociate
    | UdpData
    | WindowUpdate
    | Abandoned
)

_EMPTY_TAGS: dict[type, bytes] = {
    KeepAlive: b"\x03",
    Close: b"\x04",
    ConnectOk: b"\x05",
    UdpAssociate: b"\x09",
}
_SINGLETONS: dict[int, RelayMessage] = {
    RelayTag.KEEPALIVE: KeepAlive(),
    RelayTag.CLOSE: Close(),
    RelayTag.CONNECT_OK: ConnectOk(),
    RelayTag.UDP_ASSOCIATE: UdpAssociate(),
}
_U16 = struct.Struct(">H")


def _field(tag: int, body: bytes) -> bytes:
    body = body[:MAX_FIELD]  # spec §8: tags 1, 2, 6, 7, 8 truncate to 65535 bytes
    return b"".join((bytes((tag,)), _U16.pack(len(body)), body))


def encode_data_header(length: int) -> bytes:
    """The 3 bytes in front of ``length`` bytes of stream data (hot path helper)."""
    return b"\x02" + _U16.pack(length)


def encode_relay(message: RelayMessage) -> bytes:
    """Encode one relay message (spec §8)."""
    if isinstance(message, Data):
        return _field(RelayTag.DATA, message.data)
    empty = _EMPTY_TAGS.get(type(message))
    if empty is not None:
        return empty
    if isinstance(message, Connect):
        return _field(RelayTag.CONNECT, message.address.encode())
    if isinstance(message, Error):
        return _field(RelayTag.ERROR, message.message.encode())
    if isinstance(message, Ping):
        return _field(RelayTag.PING, message.timestamp.to_bytes(8, "big"))
    if isinstance(message, Pong):
        return _field(RelayTag.PONG, message.timestamp.to_bytes(8, "big"))
    if isinstance(message, WindowUpdate):
        return encode_window_update(message.max_offset)
    if isinstance(message, Abandoned):
        return encode_abandoned(message.nonce)
    if isinstance(message, UdpData):
        address = message.address.encode()
        if len(address) > MAX_FIELD or len(message.data) > MAX_FIELD:
            raise ValueError("UdpData fields are limited to 65535 bytes")
        return b"".join(
            (b"\x0a", _U16.pack(len(address)), address, _U16.pack(len(message.data)), message.data)
        )
    raise TypeError(f"not a relay message: {message!r}")


def _take(payload: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 2 > len(payload):
        raise RemoteProtocolError("relay message truncated")
    (length,) = _U16.unpack_from(payload, offset)
    start = offset + 2
    end = start + length
    if end > len(payload):
        raise RemoteProtocolError("relay message truncated")
    return payload[start:end], end


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("relay message text is not UTF-8") from exc


def decode_relay(payload: bytes) -> RelayMessage:
    """Decode one relay message; extra trailing bytes are ignored (spec §8)."""
    if not payload:
        raise RemoteProtocolError("empty relay message")
    tag = payload[0]
    if tag == RelayTag.DATA:
        body, _ = _take(payload, 1)
        return Data(bytes(body))
    single = _SINGLETONS.get(tag)
    if single is not None:
        return single
    if tag == RelayTag.CONNECT:
        body, _ = _take(payload, 1)
        return Connect(_text(body))
    if tag == RelayTag.ERROR:
        body, _ = _take(payload, 1)
        return Error(_text(body))
    if tag in (RelayTag.PING, RelayTag.PONG):
        body, _ = _take(payload, 1)
        if len(body) != 8:
            raise RemoteProtocolError("ping/pong timestamp must be 8 bytes")
        ts = int.from_bytes(body, "big")
        return Ping(ts) if tag == RelayTag.PING else Pong(ts)
    if tag == RelayTag.UDP_DATA:
        address, offset = _take(payload, 1)
        data, _ = _take(payload, offset)
        return UdpData(_text(address), bytes(data))
    if tag == RelayTag.WINDOW_UPDATE:
        body, _ = _take(payload, 1)
        if len(body) != 8:
            raise RemoteProtocolError("window update offset must be 8 bytes")
        return WindowUpdate(int.from_bytes(body, "big"))
    if tag == RelayTag.ABANDONED:
        nonce = parse_abandoned(payload)
        if nonce is None:
            raise RemoteProtocolError("abandoned nonce must be 8 bytes")
        return Abandoned(nonce)
    raise RemoteProtocolError(f"unknown relay tag {tag}")


# -------------------------------------------------------------------- the extension hello

EXTENSION_MAGIC = b"OSTPX"
EXTENSION_VERSION = 1
EXT_FLOW_CONTROL = 0x1
"""Flag: per-stream flow control (WindowUpdate, credit per stream)."""
EXT_PATH_PROBES = 0x2
"""Flag: path MTU probes are abandoned explicitly (Abandoned, tag 0x41): a lost probe's nonce
counts as received, so its hole closes without reporting data lost."""
SUPPORTED_EXTENSIONS = EXT_FLOW_CONTROL | EXT_PATH_PROBES
MIN_STREAM_WINDOW = 64 * 1024
"""Smallest initial stream window a hello may announce; a client sends at most this much per
stream before the server's answer arrives, so it never exceeds the server's initial credit."""
_HELLO = struct.Struct(">5sBII")  # magic, version, flags, initial stream window
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class ExtensionHello:
    """The trailer of a KeepAlive that offers (client) or accepts (server) the extension."""

    version: int
    flags: int
    """Bitmask of extensions: offered by the client, accepted (a subset) by the server."""
    stream_window: int
    """The sender's initial receive window for every stream (bytes)."""


def encode_extension_hello(hello: ExtensionHello) -> bytes:
    """A whole relay payload: KeepAlive (tag 3) followed by the hello trailer."""
    return b"\x03" + _HELLO.pack(EXTENSION_MAGIC, hello.version, hello.flags, hello.stream_window)


def parse_extension_hello(payload: bytes) -> ExtensionHello | None:
    """The hello in a KeepAlive's trailer, or None (then it is a plain KeepAlive).

    Strict: the tag must be KeepAlive, the magic exact, version at least 1, the window at least
    :data:`MIN_STREAM_WINDOW`. Bytes after the fields are ignored (room for later versions).
    """
    if len(payload) < 1 + _HELLO.size or payload[0] != RelayTag.KEEPALIVE:
        return None
    magic, version, flags, window = _HELLO.unpack_from(payload, 1)
    if magic != EXTENSION_MAGIC or version < 1 or window < MIN_STREAM_WINDOW:
        return None
    return ExtensionHello(version, flags, window)


def encode_window_update(max_offset: int) -> bytes:
    """WindowUpdate encoded like Ping: tag, ``len:u16`` = 8, offset u64 (hot path helper)."""
    return b"\x40\x00\x08" + _U64.pack(max_offset)


def encode_abandoned(nonce: int) -> bytes:
    """Abandoned encoded like Ping: tag 0x41, ``len:u16`` = 8, the nonce as u64."""
    return b"\x41\x00\x08" + _U64.pack(nonce)


def parse_abandoned(payload: bytes) -> int | None:
    """The nonce of an Abandoned relay payload, or None if it is not exactly that."""
    if len(payload) < 11 or payload[0] != RelayTag.ABANDONED or payload[1:3] != b"\x00\x08":
        return None
    return int(_U64.unpack_from(payload, 3)[0])
