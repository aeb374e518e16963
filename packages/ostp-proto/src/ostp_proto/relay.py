"""Relay messages: the payload of every Data frame (spec §8)."""

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


RelayMessage: TypeAlias = (
    Connect | Data | KeepAlive | Close | ConnectOk | Error | Ping | Pong | UdpAssociate | UdpData
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
    raise RemoteProtocolError(f"unknown relay tag {tag}")
