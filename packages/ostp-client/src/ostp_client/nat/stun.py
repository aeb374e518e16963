"""STUN message codec (RFC 8489) with the TURN attributes (RFC 8656) and ChannelData framing.

Parse once at the edge: :func:`decode_message` turns bytes into a validated
:class:`StunMessage` or raises :class:`StunParseError`; nothing else escapes it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ostp_client.nat.errors import StunParseError

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442  # RFC 8489 §5
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_SIZE = 20  # RFC 8489 §5
TRANSACTION_ID_SIZE = 12  # RFC 8489 §5
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7
MESSAGE_INTEGRITY_SIZE = 20  # HMAC-SHA1, RFC 8489 §14.5
CHANNEL_DATA_HEADER = 4  # RFC 8656 §12.4
CHANNEL_MIN = 0x4000  # RFC 8656 §12
CHANNEL_MAX = 0x4FFF  # RFC 8656 §12: the range a client may bind
CHANNEL_DATA_MAX = 0x7FFF  # RFC 8656 §12.5: 0x5000-0x7FFF still parse as ChannelData (RFC 5766)
TRANSPORT_UDP = 17  # RFC 8656 §18.8: the IANA protocol number in REQUESTED-TRANSPORT

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_CHANNEL_HEADER = struct.Struct("!HH")
_U32 = struct.Struct("!I")


class Method(enum.IntEnum):
    """STUN methods (RFC 8489 §18.2, RFC 8656 §17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(enum.IntEnum):
    """The two class bits C1 C0 (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(enum.IntEnum):
    """Attribute types used by this client (RFC 8489 §18.3, RFC 8656 §18)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_TRANSPORT = 0x0019
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028


def message_type(method: int, cls: MessageClass) -> int:
    """Interleave the 12 method bits and the 2 class bits as RFC 8489 §5 Figure 3 draws them."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def split_message_type(value: int) -> tuple[int, MessageClass]:
    """Inverse of :func:`message_type`."""
    method = (value & 0x000F) | ((value >> 1) & 0x0070) | ((value >> 2) & 0x0F80)
    cls = MessageClass(((value >> 4) & 0b01) | ((value >> 7) & 0b10))
    return method, cls


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A decoded, structurally valid STUN message.

    ``attributes`` keeps wire order and duplicates; attributes after MESSAGE-INTEGRITY other than
    FINGERPRINT are ignored as RFC 8489 §14.5 requires. Integrity and fingerprint are checked on
    demand with :meth:`verify_integrity` / :meth:`verify_fingerprint`, because the key depends on
    the transaction.
    """

    method: int
    cls: MessageClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes = field(default=b"", repr=False, compare=False)
    integrity_offset: int | None = field(default=None, repr=False, compare=False)
    fingerprint_offset: int | None = field(default=None, repr=False, compare=False)

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for kind, value in self.attributes:
            if kind == attr_type:
                return value
        return None

    @property
    def has_integrity(self) -> bool:
        return self.integrity_offset is not None

    @property
    def has_fingerprint(self) -> bool:
        return self.fingerprint_offset is not None

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY (HMAC-SHA1) with ``key``; False when absent or wrong."""
        offset = self.integrity_offset
        if offset is None:
            return False
        expected = _integrity(self.raw[:offset], key)
        received = self.raw[offset + 4 : offset + 4 + MESSAGE_INTEGRITY_SIZE]
        return hmac.compare_digest(expected, received)

    def verify_fingerprint(self) -> bool:
        """Check FINGERPRINT; False when absent or wrong."""
        offset = self.fingerprint_offset
        if offset is None:
            return False
        received = int.from_bytes(self.raw[offset + 4 : offset + 8], "big")
        return received == _fingerprint(self.raw[:offset])


def _with_length(prefix: bytes, total_after: int) -> bytes:
    """``prefix`` (a message head) with its length field set to ``total_after`` - header."""
    return prefix[:2] + struct.pack("!H", total_after - HEADER_SIZE) + prefix[4:]


def _integrity(prefix: bytes, key: bytes) -> bytes:
    # RFC 8489 §14.5: the length field counts up to and including MESSAGE-INTEGRITY, and the
    # HMAC covers the message up to (excluding) the MESSAGE-INTEGRITY attribute.
    adjusted = _with_length(prefix, len(prefix) + 4 + MESSAGE_INTEGRITY_SIZE)
    return hmac.new(key, adjusted, hashlib.sha1).digest()


def _fingerprint(prefix: bytes) -> int:
    # RFC 8489 §14.7: CRC-32 of the message up to the attribute, length including it, XOR'ed.
    adjusted = _with_length(prefix, len(prefix) + 8)
    return (zlib.crc32(adjusted) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def encode_message(
    method: int,
    cls: MessageClass,
    transaction_id: bytes,
    attributes: Sequence[tuple[int, bytes]] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
    padding: bytes = b"\x00",
) -> bytes:
    """Serialise a STUN message; MESSAGE-INTEGRITY then FINGERPRINT are appended last.

    ``padding`` is the byte used to pad attribute values to 4 bytes (RFC 8489 §14: any value;
    RFC 5769's vectors use 0x20).
    """
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError("a STUN transaction id is 12 bytes")
    parts = []
    for attr_type, value in attributes:
        if len(value) > 0xFFFF:
            raise ValueError("a STUN attribute value is at most 65535 bytes")
        parts.append(_ATTR_HEADER.pack(attr_type, len(value)) + value + padding * _pad(len(value)))
    body = b"".join(parts)
    head = _HEADER.pack(message_type(method, cls), len(body), MAGIC_COOKIE, transaction_id)
    message = head + body
    if integrity_key is not None:
        digest = _integrity(message, integrity_key)
        message += _ATTR_HEADER.pack(Attr.MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SIZE) + digest
    if fingerprint:
        crc = _fingerprint(message)
        message += _ATTR_HEADER.pack(Attr.FINGERPRINT, 4) + _U32.pack(crc)
    if len(message) - HEADER_SIZE > 0xFFFF:
        raise ValueError("a STUN message body is at most 65535 bytes")
    return _with_length(message[:HEADER_SIZE], len(message)) + message[HEADER_SIZE:]


def looks_like_stun(data: bytes) -> bool:
    """Cheap header check (RFC 8489 §5/§7.3): top bits 00, magic cookie, consistent length."""
    return (
        len(data) >= HEADER_SIZE
        and data[0] & 0xC0 == 0
        and data[4:8] == MAGIC_COOKIE_BYTES
        and (data[2] << 8 | data[3]) == len(data) - HEADER_SIZE
        and data[3] & 0x03 == 0
    )


def decode_message(data: bytes) -> StunMessage:
    """Parse and validate one STUN message; raises :class:`StunParseError` and nothing else."""
    if not looks_like_stun(data):
        raise StunParseError("not a STUN message (header, magic cookie or length)")
    msg_type, _, _, transaction_id = _HEADER.unpack_from(data)
    method, cls = split_message_type(msg_type)
    attributes: list[tuple[int, bytes]] = []
    integrity_offset: int | None = None
    fingerprint_offset: int | None = None
    pos = HEADER_SIZE
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise StunParseError("truncated attribute header")
        attr_type, length = _ATTR_HEADER.unpack_from(data, pos)
        value_end = pos + 4 + length
        if value_end + _pad(length) > end:
            raise StunParseError("attribute runs past the end of the message")
        value = data[pos + 4 : value_end]
        if fingerprint_offset is not None:
            raise StunParseError("FINGERPRINT is not the last attribute")  # RFC 8489 §14.7
        if attr_type == Attr.FINGERPRINT:
            if length != 4:
                raise StunParseError("FINGERPRINT must be 4 bytes")
            fingerprint_offset = pos
        elif integrity_offset is not None:
            pass  # RFC 8489 §14.5: ignore everything after MESSAGE-INTEGRITY but FINGERPRINT
        elif attr_type == Attr.MESSAGE_INTEGRITY:
            if length != MESSAGE_INTEGRITY_SIZE:
                raise StunParseError("MESSAGE-INTEGRITY must be 20 bytes")
            integrity_offset = pos
        else:
            attributes.append((attr_type, value))
        pos = value_end + _pad(length)
    return StunMessage(
        method=method,
        cls=cls,
        transaction_id=transaction_id,
        attributes=tuple(attributes),
        raw=bytes(data),
        integrity_offset=integrity_offset,
        fingerprint_offset=fingerprint_offset,
    )


# --- attribute values -------------------------------------------------------------------------


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" password), the long-term credential key (RFC 8489 §9.2.2).

    The RFC runs the password through OpaqueString (RFC 8265) first; for the ASCII credentials
    a TURN deployment uses that is the identity, so it is only NFC-normalised here.
    """
    text = f"{username}:{realm}:{unicodedata.normalize('NFC', password)}"
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()


def encode_xor_address(address: Address, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS / XOR-PEER-ADDRESS / XOR-RELAYED-ADDRESS value (RFC 8489 §14.2)."""
    host, port = address[0], address[1]
    ip = ipaddress.ip_address(host)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        xaddr = int(ip) ^ MAGIC_COOKIE
        return struct.pack("!BBHI", 0, 0x01, xport, xaddr)
    mask = int.from_bytes(MAGIC_COOKIE_BYTES + transaction_id, "big")
    return struct.pack("!BBH", 0, 0x02, xport) + (int(ip) ^ mask).to_bytes(16, "big")


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    """Inverse of :func:`encode_xor_address`; raises :class:`StunParseError`."""
    if len(value) < 4:
        raise StunParseError("address attribute too short")
    family = value[1]
    port = ((value[2] << 8) | value[3]) ^ (MAGIC_COOKIE >> 16)
    if family == 0x01 and len(value) == 8:
        raw = int.from_bytes(value[4:8], "big") ^ MAGIC_COOKIE
        return str(ipaddress.IPv4Address(raw)), port
    if family == 0x02 and len(value) == 20:
        mask = int.from_bytes(MAGIC_COOKIE_BYTES + transaction_id, "big")
        raw = int.from_bytes(value[4:20], "big") ^ mask
        return str(ipaddress.IPv6Address(raw)), port
    raise StunParseError("bad address family or length")


def encode_error_code(code: int, reason: str) -> bytes:
    """ERROR-CODE value (RFC 8489 §14.8)."""
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")


def decode_error_code(value: bytes) -> tuple[int, str]:
    """(code, reason phrase) of an ERROR-CODE value; raises :class:`StunParseError`."""
    if len(value) < 4:
        raise StunParseError("ERROR-CODE too short")
    code = (value[2] & 0x07) * 100 + value[3]
    if not 300 <= code <= 699 or value[3] > 99:
        raise StunParseError("ERROR-CODE out of range")
    return code, value[4:].decode("utf-8", errors="replace")


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def decode_u32(value: bytes) -> int:
    if len(value) != 4:
        raise StunParseError("32-bit attribute of the wrong length")
    result: int = _U32.unpack(value)[0]
    return result


def decode_text(value: bytes) -> str:
    """REALM, NONCE, SOFTWARE, USERNAME: UTF-8 text."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunParseError("text attribute is not UTF-8") from exc


def encode_channel_number(channel: int) -> bytes:
    """CHANNEL-NUMBER value: the number then RFFU zeros (RFC 8656 §18.1)."""
    return struct.pack("!HH", channel, 0)


def encode_requested_transport(protocol: int = TRANSPORT_UDP) -> bytes:
    """REQUESTED-TRANSPORT value (RFC 8656 §18.7)."""
    return struct.pack("!B3x", protocol)


# --- ChannelData (RFC 8656 §12.4) -------------------------------------------------------------


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    """Frame ``data`` for ``channel``; padding to 4 bytes is optional over UDP (§12.5)."""
    if not CHANNEL_MIN <= channel <= CHANNEL_DATA_MAX:
        raise ValueError("channel number out of range")
    if len(data) > 0xFFFF:
        raise ValueError("ChannelData payload is at most 65535 bytes")
    frame = _CHANNEL_HEADER.pack(channel, len(data)) + data
    return frame + b"\x00" * _pad(len(data)) if pad else frame


def looks_like_channel_data(data: bytes) -> bool:
    """First two bits 01, channel 0x4000-0x7FFF, length field fits (padding up to 3 bytes)."""
    if len(data) < CHANNEL_DATA_HEADER or data[0] & 0xC0 != 0x40:
        return False
    slack = len(data) - CHANNEL_DATA_HEADER - (data[2] << 8 | data[3])
    return 0 <= slack <= 3


def decode_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel, payload) of a ChannelData frame; raises :class:`StunParseError`."""
    if not looks_like_channel_data(data):
        raise StunParseError("not a ChannelData frame")
    channel, length = _CHANNEL_HEADER.unpack_from(data)
    return channel, data[CHANNEL_DATA_HEADER : CHANNEL_DATA_HEADER + length]
