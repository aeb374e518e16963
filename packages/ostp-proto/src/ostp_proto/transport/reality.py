"""Reality: OSTP's stream dressed as a TLS 1.3 connection (spec §10.6), both roles, sans-IO.

Kept from upstream, byte for byte (``upstream-transport-vectors.json``): the key exchange
(X25519 of the client's ephemeral key with the server's static key ``pbk``; HKDF-SHA256 without
salt, info ``ostp-reality-v1`` → auth key || v1 data key), the ClientHello (its 32-byte legacy
session id is ChaCha20-Poly1305(auth key, nonce 0¹²)(short id || ts:u64be)), followed by a CCS
record, the server's five-record flight, and the data record format
``17 03 03 len:u16 || ChaCha20-Poly1305(key, nonce 0⁴ || counter:u64le)(chunk)``.

Fixed here (upstream's own Reality cannot connect; docs/protocol-deviations.md, "Reality v2"):

* the ServerHello record of the flight says 127 bytes (handshake length 123), which is what it
  carries; upstream says 122/118 and its client rejects the flight;
* the server takes the client's CCS in any segmentation (with the ClientHello, alone, split);
* each direction has its own data key, HKDF-SHA256(shared, info ``ostp-reality-v2 c2s`` /
  ``ostp-reality-v2 s2c``), so equal plaintexts never give equal records. A client of upstream
  (v1, one key both ways) is not understood: its first data record fails authentication and
  the server closes the connection.

Anything unauthenticated (a hello that does not decrypt, a wrong short id or SNI, a stale or
replayed timestamp) is for the shell to forward to the real site (``dest``).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import LocalProtocolError, RemoteProtocolError

RandomBytes = Callable[[int], bytes]

INFO_V1 = b"ostp-reality-v1"  # upstream: auth key || data key
INFO_C2S = b"ostp-reality-v2 c2s"  # ours: the client → server data key
INFO_S2C = b"ostp-reality-v2 s2c"  # ours: the server → client data key
DEFAULT_SNI = "www.microsoft.com"  # spec §10.6: upstream's client default
TIMESTAMP_WINDOW = 60  # spec §10.6: |ts - now| <= 60 s
REPLAY_CACHE_SIZE = 100_000
SHORT_ID_LEN = 8  # spec §10.10: 16 hex characters

CONTENT_CCS = 0x14
CONTENT_HANDSHAKE = 0x16
CONTENT_APPLICATION = 0x17
RECORD_HEADER = 5
MAX_PLAINTEXT = 1 << 14  # RFC 8446 §5.1
MAX_RECORD_BODY = MAX_PLAINTEXT + 256  # RFC 8446 §5.2: TLSCiphertext length limit
AEAD_TAG = 16
CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
SERVER_FLIGHT_RECORDS = 5

# The server's ServerHello record: upstream's static blob (zero random and session id, a fixed
# key share) with its record length 0x7a → 0x7f and handshake length 0x76 → 0x7b, the lengths
# of what it carries (spec §10.6; vectors: reality.server_flight).
UPSTREAM_SERVER_HELLO = bytes.fromhex(
    "160303007a0200007603030000000000000000000000000000000000000000000000"
    "000000000000000000000000200000000000000000000000000000000000000000"
    "0000000000000000000000000000130100002e002b0002030400330024001d0020"
    "e29b191a62d0572e9a30d0fb9d08e50bc78d591dfc1dbafbfa533411db1c8e11"
)
SERVER_HELLO = (
    UPSTREAM_SERVER_HELLO[:3]
    + struct.pack(">H", len(UPSTREAM_SERVER_HELLO) - RECORD_HEADER)
    + UPSTREAM_SERVER_HELLO[5:6]
    + (len(UPSTREAM_SERVER_HELLO) - RECORD_HEADER - 4).to_bytes(3, "big")
    + UPSTREAM_SERVER_HELLO[9:]
)


def _zero_record(size: int) -> bytes:
    return bytes((CONTENT_APPLICATION, 3, 3)) + struct.pack(">H", size) + bytes(size)


# ServerHello, CCS, then three zero-filled application-data records standing for
# EncryptedExtensions, Certificate and CertificateVerify + Finished (108, 812, 52 bytes).
SERVER_FLIGHT = SERVER_HELLO + CCS_RECORD + _zero_record(108) + _zero_record(812) + _zero_record(52)

_U64BE = struct.Struct(">Q")
_U64LE = struct.Struct("<Q")
_HEADER = struct.Struct(">BHH")
_ZERO_NONCE = bytes(12)


# ------------------------------------------------------------------------- key schedule


def encode_key(raw: bytes) -> str:
    """A 32-byte X25519 key as base64url without padding (upstream's ``pbk``/``private_key``)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 bytes of a base64url key (padding optional); ValueError otherwise."""
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if len(raw) != 32:
        raise ValueError(f"an X25519 key is 32 bytes, not {len(raw)}")
    return raw


def public_key(private: bytes) -> bytes:
    """The X25519 public key of ``private`` (clamped as RFC 7748 says)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def generate_keypair(random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes]:
    """``(private, public)`` raw 32-byte keys for a server (``gen-key --reality``)."""
    private = random_bytes(32)
    return private, public_key(private)


def shared_secret(private: bytes, peer_public: bytes) -> bytes:
    """X25519; RemoteProtocolError for a low-order peer key (an all-zero secret)."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError:
        raise RemoteProtocolError("X25519 peer key of low order") from None


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True, slots=True)
class RealityKeys:
    auth_key: bytes
    """Seals the ClientHello's session id (upstream's, okm[0:32] of info ``ostp-reality-v1``)."""
    c2s_key: bytes
    """Data records client → server (ours: info ``ostp-reality-v2 c2s``)."""
    s2c_key: bytes
    """Data records server → client (ours: info ``ostp-reality-v2 s2c``)."""
    v1_data_key: bytes
    """Upstream's single data key (okm[32:64]); kept for the vectors, never used for data."""


def derive_keys(shared: bytes) -> RealityKeys:
    okm = _hkdf(shared, INFO_V1, 64)
    return RealityKeys(okm[:32], _hkdf(shared, INFO_C2S, 32), _hkdf(shared, INFO_S2C, 32), okm[32:])


def seal_session_id(auth_key: bytes, short_id: bytes, unix_seconds: int) -> bytes:
    """The 32-byte legacy session id: AEAD(auth key, 0¹²)(short id || ts:u64be)."""
    if len(short_id) != SHORT_ID_LEN:
        raise LocalProtocolError("the Reality short id is 8 bytes (16 hex characters)")
    plain = short_id + _U64BE.pack(unix_seconds)
    return ChaCha20Poly1305(auth_key).encrypt(_ZERO_NONCE, plain, None)


def open_session_id(auth_key: bytes, session_id: bytes) -> tuple[bytes, int] | None:
    """``(short id, ts)`` from a session id, None if it does not authenticate."""
    if len(session_id) != 32:
        return None
    try:
        plain = ChaCha20Poly1305(auth_key).decrypt(_ZERO_NONCE, session_id, None)
    except InvalidTag:
        return None
    return plain[:8], _U64BE.unpack_from(plain, 8)[0]


# ------------------------------------------------------------------------- ClientHello


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


def build_client_hello(
    sni: str, session_id: bytes, client_public: bytes, client_random: bytes
) -> bytes:
    """The ClientHello record exactly as upstream builds it (the CCS record is separate)."""
    try:
        name = sni.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError("the SNI must be an ASCII host name") from None
    if len(session_id) != 32 or len(client_public) != 32 or len(client_random) != 32:
        raise LocalProtocolError("session id, key share and random are 32 bytes each")
    ext = b"".join(
        (
            _ext(0x0000, struct.pack(">HBH", len(name) + 3, 0, len(name)) + name),
            _ext(0x000A, bytes.fromhex("0006001d00170018")),
            _ext(0x0033, struct.pack(">HHH", 36, 0x001D, 32) + client_public),
            _ext(0x002B, bytes.fromhex("0403040303")),
            _ext(0x0010, b"\x00\x0c\x02h2\x08http/1.1"),
            _ext(0x000D, bytes.fromhex("00080403080404010503")),
        )
    )
    body = (
        b"\x03\x03"
        + client_random
        + b"\x20"
        + session_id
        + bytes.fromhex("0006130113031302")
        + b"\x01\x00"
        + struct.pack(">H", len(ext))
        + ext
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return struct.pack(">BHH", CONTENT_HANDSHAKE, 0x0301, len(handshake)) + handshake


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the server needs from a ClientHello."""

    random: bytes
    session_id: bytes
    sni: str | None
    key_share: bytes | None
    """The client's X25519 key share, if it offered one."""


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise RemoteProtocolError("truncated ClientHello")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def record_length(buf: bytes | bytearray) -> int | None:
    """Total length of the TLS record at the start of ``buf`` (header included), once known."""
    if len(buf) < RECORD_HEADER:
        return None
    return RECORD_HEADER + ((buf[3] << 8) | buf[4])


def parse_client_hello(record: bytes) -> ClientHello:
    """Parse one handshake record holding a whole ClientHello; RemoteProtocolError otherwise.

    Bounded by the record (at most 5 + 2^14 + 256 bytes); extensions other than server_name
    and key_share are skipped, as upstream does.
    """
    r = _Reader(bytes(record))
    content, _version, length = r.u8(), r.u16(), r.u16()
    if content != CONTENT_HANDSHAKE or length > MAX_RECORD_BODY or r.left != length:
        raise RemoteProtocolError("not one whole handshake record")
    if r.u8() != 0x01:
        raise RemoteProtocolError("not a ClientHello")
    hs = _Reader(r.take(r.u24()))
    hs.u16()  # legacy_version
    random = hs.take(32)
    session_id = hs.vec8()
    hs.vec16()  # cipher suites
    hs.vec8()  # compression methods
    exts = _Reader(hs.vec16())
    sni: str | None = None
    share: bytes | None = None
    while exts.left >= 4:
        kind = exts.u16()
        body = _Reader(exts.vec16())
        if kind == 0x0000 and sni is None:
            names = _Reader(body.vec16())
            while names.left >= 3:
                name_type = names.u8()
                name = names.vec16()
                if name_type == 0:
                    try:
                        sni = name.decode("ascii")
                    except UnicodeDecodeError:
                        raise RemoteProtocolError("server name is not ASCII") from None
                    break
        elif kind == 0x0033 and share is None:
            shares = _Reader(body.vec16())
            while shares.left >= 4:
                group = shares.u16()
                key = shares.vec16()
                if group == 0x001D and len(key) == 32:
                    share = key
                    break
    return ClientHello(random, session_id, sni, share)


# ------------------------------------------------------------------------------ records


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + _U64LE.pack(counter)


class RecordSealer:
    """Seals plaintext into application-data records, at most 2^14 bytes of plaintext each."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(plaintext)
        parts: list[bytes] = []
        encrypt = self._aead.encrypt
        for start in range(0, len(view), MAX_PLAINTEXT):
            chunk = view[start : start + MAX_PLAINTEXT]
            sealed = encrypt(_nonce(self.counter), chunk, None)
            self.counter += 1
            parts.append(_HEADER.pack(CONTENT_APPLICATION, 0x0303, len(sealed)))
            parts.append(sealed)
        return b"".join(parts)


class RecordOpener:
    """Opens application-data records from a byte stream; holds at most one partial record.

    ``skip_ccs``: change_cipher_spec records (``14 03 03 00 01 01``) met before the first
    application-data record are dropped, in whatever pieces they arrive (the client's CCS after
    its ClientHello). Any other record type, an oversized record or a failed tag is a
    RemoteProtocolError: the shell closes the connection.
    """

    __slots__ = ("_aead", "_buf", "_need", "_skip_ccs", "counter")

    def __init__(self, key: bytes, *, skip_ccs: bool = False) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._buf = bytearray()
        self._need = RECORD_HEADER
        self._skip_ccs = skip_ccs
        self.counter = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        end = len(buf)
        if end < self._need:
            return []
        out: list[bytes] = []
        pos = 0
        need = RECORD_HEADER
        decrypt = self._aead.decrypt
        view = memoryview(buf)
        try:
            while end - pos >= RECORD_HEADER:
                content = buf[pos]
                n = (buf[pos + 3] << 8) | buf[pos + 4]
                if content == CONTENT_CCS and self._skip_ccs:
                    if n != 1:
                        raise RemoteProtocolError("malformed change_cipher_spec record")
                elif content != CONTENT_APPLICATION:
                    raise RemoteProtocolError(f"unexpected TLS record type {content:#x}")
                elif n > MAX_RECORD_BODY or n < AEAD_TAG:
                    raise RemoteProtocolError(f"TLS record of {n} bytes")
                if end - pos < RECORD_HEADER + n:
                    need = RECORD_HEADER + n
                    break
                start = pos + RECORD_HEADER
                pos = start + n
                if content == CONTENT_CCS:
                    continue
                self._skip_ccs = False
                try:  # the slice is a temporary: no export outlives the loop
                    out.append(decrypt(_nonce(self.counter), view[start:pos], None))
                except InvalidTag:
                    raise RemoteProtocolError("TLS record failed authentication") from None
                self.counter += 1
        finally:
            view.release()
        if pos:
            del buf[:pos]
        self._need = need
        return out


# ------------------------------------------------------------------------------ client


class RealityClient:
    """The client role: :meth:`hello` to send first, then :meth:`receive` / :meth:`seal`.

    The first five records from the server are its flight and are skipped; every record after
    them must authenticate under the server → client key.
    """

    def __init__(
        self,
        *,
        server_public: bytes,
        short_id: bytes,
        sni: str = DEFAULT_SNI,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if len(server_public) != 32:
            raise LocalProtocolError("the server's public key (pbk) is 32 bytes")
        if len(short_id) != SHORT_ID_LEN:
            raise LocalProtocolError("the Reality short id is 8 bytes (16 hex characters)")
        self._server_public = server_public
        self._short_id = short_id
        self._sni = sni
        self._random = random_bytes
        self._flight_left = SERVER_FLIGHT_RECORDS
        self._flight_buf = bytearray()
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None

    @property
    def flight_received(self) -> bool:
        return self._flight_left == 0

    def hello(self, unix_now: float) -> bytes:
        """ClientHello record + CCS record, to send first."""
        if self._sealer is not None:
            raise LocalProtocolError("hello() may be called once")
        private = self._random(32)
        client_public = public_key(private)
        try:
            keys = derive_keys(shared_secret(private, self._server_public))
        except RemoteProtocolError:
            raise LocalProtocolError("the server's public key (pbk) is of low order") from None
        session_id = seal_session_id(keys.auth_key, self._short_id, int(unix_now))
        record = build_client_hello(self._sni, session_id, client_public, self._random(32))
        self._sealer = RecordSealer(keys.c2s_key)
        self._opener = RecordOpener(keys.s2c_key)
        return record + CCS_RECORD

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        if self._sealer is None:
            raise LocalProtocolError("hello() first")
        return self._sealer.seal(plaintext)

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Plaintext chunks from the server; RemoteProtocolError on a bad flight or record."""
        if self._opener is None:
            raise LocalProtocolError("hello() first")
        if self._flight_left:
            buf = self._flight_buf
            buf += data
            while self._flight_left:
                total = record_length(buf)
                if total is None or len(buf) < total:
                    if total is not None and total - RECORD_HEADER > MAX_RECORD_BODY:
                        raise RemoteProtocolError("server flight record too large")
                    return []
                if buf[0] not in (CONTENT_HANDSHAKE, CONTENT_CCS, CONTENT_APPLICATION):
                    raise RemoteProtocolError("server flight is not TLS")
                del buf[:total]
                self._flight_left -= 1
            data = bytes(buf)
            self._flight_buf = bytearray()
        return self._opener.feed(data)


# ------------------------------------------------------------------------------ server


class RealityReplayCache:
    """Session ids seen within the timestamp window (a replayed hello goes to ``dest``)."""

    def __init__(self, capacity: int = REPLAY_CACHE_SIZE, window: int = TIMESTAMP_WINDOW) -> None:
        self.capacity = capacity
        self.window = window
        self._seen: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def purge(self, unix_now: float) -> None:
        now = int(unix_now)
        self._seen = {k: ts for k, ts in self._seen.items() if abs(now - ts) <= self.window}

    def add(self, session_id: bytes, ts: int, unix_now: float) -> bool:
        """Remember ``session_id``; False if it was seen (or the cache is full of live ones)."""
        if session_id in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            self.purge(unix_now)
            if len(self._seen) >= self.capacity:
                return False
        self._seen[session_id] = ts
        return True


@dataclass(slots=True)
class RealityStats:
    accepted: int = 0
    parse_drop: int = 0
    sni_drop: int = 0
    key_drop: int = 0
    auth_drop: int = 0
    short_id_drop: int = 0
    timestamp_drop: int = 0
    replay_drop: int = 0


class RealityServerSession:
    """An accepted Reality connection: send :attr:`flight`, then open and seal records."""

    __slots__ = ("_opener", "_sealer", "flight")

    def __init__(self, keys: RealityKeys) -> None:
        self.flight = SERVER_FLIGHT
        self._opener = RecordOpener(keys.c2s_key, skip_ccs=True)
        self._sealer = RecordSealer(keys.s2c_key)

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Plaintext from the client's records (its CCS skipped however it is cut)."""
        return self._opener.feed(data)

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        return self._sealer.seal(plaintext)


class RealityAcceptor:
    """Decides whether a ClientHello record comes from a client of ours (spec §10.6)."""

    def __init__(
        self,
        *,
        private_key: bytes,
        short_ids: Iterable[bytes],
        server_names: Iterable[str],
        timestamp_window: int = TIMESTAMP_WINDOW,
        replay_cache: RealityReplayCache | None = None,
    ) -> None:
        if len(private_key) != 32:
            raise LocalProtocolError("the Reality private key is 32 bytes")
        self._private = private_key
        self.public_key = public_key(private_key)
        self._short_ids = frozenset(short_ids)
        self._server_names = frozenset(n.lower() for n in server_names)
        self.timestamp_window = timestamp_window
        self.replay = replay_cache or RealityReplayCache(window=timestamp_window)
        self.stats = RealityStats()

    def accept(self, record: bytes, unix_now: float) -> RealityServerSession | None:
        """A session for an authentic, fresh hello; None for anything else (forward it)."""
        stats = self.stats
        try:
            hello = parse_client_hello(record)
        except RemoteProtocolError:
            stats.parse_drop += 1
            return None
        if hello.sni is None or hello.sni.lower() not in self._server_names:
            stats.sni_drop += 1
            return None
        if hello.key_share is None or len(hello.session_id) != 32:
            stats.key_drop += 1
            return None
        try:
            keys = derive_keys(shared_secret(self._private, hello.key_share))
        except RemoteProtocolError:
            stats.key_drop += 1
            return None
        opened = open_session_id(keys.auth_key, hello.session_id)
        if opened is None:
            stats.auth_drop += 1
            return None
        short_id, ts = opened
        if short_id not in self._short_ids:
            stats.short_id_drop += 1
            return None
        now = int(unix_now)
        if ts > now + self.timestamp_window or ts < now - self.timestamp_window:
            stats.timestamp_drop += 1
            return None
        if not self.replay.add(hello.session_id, ts, unix_now):
            stats.replay_drop += 1
            return None
        stats.accepted += 1
        return RealityServerSession(keys)
