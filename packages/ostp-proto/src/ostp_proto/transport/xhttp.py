"""UDP-over-TCP "xHTTP": the bearer token, the ``/stream`` and ``/wss`` requests and the
server's answers (spec §10.6), for both roles.

Everything here is byte for byte upstream's (checked against ``upstream-transport-vectors.json``):
the token is ``base64(ts:u64be || HMAC-SHA256(access key, ts:u64be))`` without padding, the
server accepts a timestamp in [now - 60 s, now + 30 s], and anything else gets a 404. Parsers
are bounded (:data:`MAX_HEAD`) and raise :class:`RemoteProtocolError` on anything that is not
one of these requests or responses.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError

TOKEN_MAX_AGE = 60  # spec §10.6: timestamp window [now - 60 s, now + 30 s]
TOKEN_MAX_AHEAD = 30
MAX_HEAD = 16384  # upstream reads the request into a 16 KiB buffer; "too large" beyond it
WSS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # upstream's fixed Sec-WebSocket-Key (RFC 6455's sample)
DEFAULT_HOST = "www.microsoft.com"

STREAM_REQUEST_LINE = b"GET /stream HTTP/1.1\r\n"
WSS_REQUEST_LINE = b"GET /wss HTTP/1.1\r\n"
STREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nX-Ostp-Server: 1\r\nContent-Type: application/octet-stream\r\n\r\n"
)
WSS_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Ostp-Server: 1\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\n\r\n"
_END = b"\r\n\r\n"
_AUTH = b"authorization: bearer "
_U64 = struct.Struct(">Q")


class Framing(enum.Enum):
    """How datagrams travel once the request was accepted."""

    STREAM = "stream"
    """``GET /stream``: ``len:u16 || datagram``."""
    WSS = "wss"
    """``GET /wss``: one WebSocket binary frame per datagram."""


# ---------------------------------------------------------------------------------- token


def make_token(access_key: str | bytes, unix_seconds: int) -> str:
    """The bearer token for ``unix_seconds`` (spec §10.6)."""
    key = access_key.encode() if isinstance(access_key, str) else bytes(access_key)
    ts = _U64.pack(unix_seconds)
    mac = hmac.new(key, ts, hashlib.sha256).digest()
    return base64.b64encode(ts + mac).rstrip(b"=").decode("ascii")


def decode_token(token: bytes) -> tuple[int, bytes]:
    """``(timestamp, mac)`` of a token; RemoteProtocolError unless canonical unpadded base64."""
    if len(token) > 256 or b"=" in token:
        raise RemoteProtocolError("malformed bearer token")
    try:
        raw = base64.b64decode(token + b"=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("malformed bearer token") from None
    # Rust's STANDARD_NO_PAD refuses non-zero trailing bits: re-encoding must give the same text
    if base64.b64encode(raw).rstrip(b"=") != token or len(raw) < 8:
        raise RemoteProtocolError("malformed bearer token")
    return _U64.unpack_from(raw)[0], raw[8:]


def verify_token(token: bytes, keys: Sequence[bytes], unix_now: float) -> int | None:
    """Index of the key whose HMAC the token carries, or None (bad, stale, unknown key)."""
    try:
        ts, mac = decode_token(token)
    except RemoteProtocolError:
        return None
    now = int(unix_now)
    if ts > now + TOKEN_MAX_AHEAD or ts < now - TOKEN_MAX_AGE:
        return None
    msg = _U64.pack(ts)
    found: int | None = None
    for index, key in enumerate(keys):
        expected = hmac.new(key, msg, hashlib.sha256).digest()
        if hmac.compare_digest(expected, mac) and found is None:
            found = index  # no early exit: time does not tell which key matched
    return found


# --------------------------------------------------------------------------- client side


def build_request(framing: Framing, host: str, token: str) -> bytes:
    """The client's request, exactly as upstream writes it (spec §10.6)."""
    if any(c in host for c in "\r\n") or any(c in token for c in "\r\n"):
        raise LocalProtocolError("the host and token must not contain line breaks")
    if framing is Framing.STREAM:
        text = f"GET /stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    else:
        text = (
            f"GET /wss HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            f"Sec-WebSocket-Key: {WSS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
    return text.encode()


def parse_response(buf: bytes | bytearray, framing: Framing) -> int | None:
    """Length of an accepting response head at the start of ``buf``, or None if incomplete.

    The bytes after it are the first framed datagrams. A refusal (404, another status, not an
    OSTP server, or a head over :data:`MAX_HEAD`) raises RemoteProtocolError, as upstream's
    client gives up on a response not starting ``HTTP/1.1 200 `` / ``HTTP/1.1 101 `` or
    without ``X-Ostp-Server``.
    """
    end = bytes(buf[: MAX_HEAD + 4]).find(_END)
    if end < 0:
        if len(buf) >= MAX_HEAD:
            raise RemoteProtocolError("response head too large")
        status = b"HTTP/1.1 200 " if framing is Framing.STREAM else b"HTTP/1.1 101 "
        prefix = bytes(buf[: len(status)])
        if not status.startswith(prefix) and not b"HTTP/1.1 404".startswith(prefix):
            raise RemoteProtocolError("not an OSTP server's response")
        return None
    head = bytes(buf[: end + 4])
    expected = b"HTTP/1.1 200 " if framing is Framing.STREAM else b"HTTP/1.1 101 "
    if not head.startswith(expected):
        line = head.split(b"\r\n", 1)[0][:80]
        raise RemoteProtocolError(f"server refused: {line.decode('latin-1')!r}")
    if b"x-ostp-server:" not in head.lower():
        raise RemoteProtocolError("the endpoint is not an OSTP server (no X-Ostp-Server)")
    return end + 4


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A ``/stream`` or ``/wss`` request head as the server parsed it."""

    framing: Framing
    token: bytes | None
    """The last ``Authorization: Bearer`` value (trimmed), None if the header is absent."""
    length: int
    """Bytes of the head, ``\\r\\n\\r\\n`` included; what follows is framed data."""


def looks_like_request(buf: bytes | bytearray) -> bool:
    """False as soon as ``buf`` cannot be the start of a ``/stream`` or ``/wss`` request."""
    n = min(len(buf), len(STREAM_REQUEST_LINE))
    prefix = bytes(buf[:n])
    return STREAM_REQUEST_LINE.startswith(prefix) or WSS_REQUEST_LINE.startswith(prefix[:19])


def parse_request(buf: bytes | bytearray) -> RequestHead | None:
    """The request head at the start of ``buf``, or None while incomplete.

    RemoteProtocolError when it is not an xHTTP request (another request line, or no end of
    head within :data:`MAX_HEAD` bytes). Matching is upstream's: the request line exactly,
    header names case-insensitively on ``authorization: bearer ``, the last one wins.
    """
    if not looks_like_request(buf):
        raise RemoteProtocolError("not an xHTTP request")
    end = bytes(buf[: MAX_HEAD + 4]).find(_END)
    if end < 0:
        if len(buf) >= MAX_HEAD:
            raise RemoteProtocolError("request head too large")
        return None
    head = bytes(buf[: end + 4])
    if head.startswith(STREAM_REQUEST_LINE):
        framing = Framing.STREAM
    elif head.startswith(WSS_REQUEST_LINE):
        framing = Framing.WSS
    else:
        raise RemoteProtocolError("not an xHTTP request")
    token: bytes | None = None
    for line in head[:end].split(b"\n"):
        if line[: len(_AUTH)].lower() == _AUTH:
            token = line[len(_AUTH) :].strip()
    return RequestHead(framing, token, end + 4)


def response_for(framing: Framing) -> bytes:
    return STREAM_RESPONSE if framing is Framing.STREAM else WSS_RESPONSE
