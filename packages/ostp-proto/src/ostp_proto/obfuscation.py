"""Header masking of handshake and data datagrams (spec §4, §5) and the data-phase AEAD.

A data datagram on the wire is ``mask(sid:4 | nonce:8) | ChaCha20-Poly1305(frame)``; the mask
is HMAC-SHA256(obfuscation_key, first 32 ciphertext bytes, zero-padded) and covers all 12
header bytes. Handshake datagrams mask ``sid:4 | noise_len:2`` with the HMAC of the Noise
message's first 32 bytes (the sender's ephemeral public key).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import RemoteProtocolError

MASK_SAMPLE_LEN = 32  # spec §4, §5
HANDSHAKE_HEADER_LEN = 6  # sid:4 | noise_len:2 (spec §4)
DATA_HEADER_LEN = 12  # sid:4 | nonce:8 (spec §5)
AEAD_TAG_LEN = 16
MIN_DATA_DATAGRAM = DATA_HEADER_LEN + 12 + AEAD_TAG_LEN  # 40: header + empty frame + tag
NONCE_PREFIX = b"\x00\x00\x00\x00"  # spec §3: 12-byte nonce = 0^4 || nonce u64 BE
MAX_NONCE = 2**64 - 1

_hmac_digest = hmac.digest
_ZEROS = bytes(MASK_SAMPLE_LEN)


def _sample(data: bytes | memoryview, start: int = 0) -> bytes:
    """The 32 bytes the mask is computed over: ``data[start:start+32]``, zero-padded."""
    s = bytes(data[start : start + MASK_SAMPLE_LEN])
    if len(s) < MASK_SAMPLE_LEN:
        s += _ZEROS[len(s) :]
    return s


_IPAD = bytes(0x36 for _ in range(64))
_OPAD = bytes(0x5C for _ in range(64))


class _HeaderMask:
    """HMAC-SHA256 under one key from precomputed inner and outer SHA-256 states (RFC 2104).

    The same digest as ``hmac.digest(key, sample, "sha256")``, without hashing the padded key
    twice per call: the two states are copied instead (1.7 -> 0.6 µs per mask here).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(a ^ b for a, b in zip(key, _IPAD, strict=True)))
        self._outer = hashlib.sha256(bytes(a ^ b for a, b in zip(key, _OPAD, strict=True)))

    def __call__(self, sample: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(sample)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def header_mask(obfuscation_key: bytes, sample: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the first 32 bytes of ``sample``, zero-padded to 32 (spec §4, §5)."""
    return _hmac_digest(obfuscation_key, _sample(sample), "sha256")


def build_handshake_datagram(
    obfuscation_key: bytes, session_id: int, noise_message: bytes, padding: bytes
) -> bytes:
    """Masked ``sid | noise_len | noise message | padding`` (spec §4)."""
    header = struct.pack(">IH", session_id, len(noise_message))
    mask = header_mask(obfuscation_key, noise_message)
    masked = bytes(a ^ b for a, b in zip(header, mask, strict=False))
    return masked + noise_message + padding


def parse_handshake_datagram(obfuscation_key: bytes, data: bytes) -> tuple[int, bytes]:
    """Unmask a handshake datagram; return ``(session_id, noise_message)``.

    Raises RemoteProtocolError when the declared Noise length does not fit the datagram.
    """
    if len(data) < HANDSHAKE_HEADER_LEN + 1:
        raise RemoteProtocolError("handshake datagram too short")
    mask = header_mask(obfuscation_key, data[HANDSHAKE_HEADER_LEN:])
    header = bytes(a ^ b for a, b in zip(data[:HANDSHAKE_HEADER_LEN], mask, strict=False))
    session_id, noise_len = struct.unpack(">IH", header)
    end = HANDSHAKE_HEADER_LEN + noise_len
    if noise_len == 0 or end > len(data):
        raise RemoteProtocolError("handshake datagram: bad noise length")
    return session_id, bytes(data[HANDSHAKE_HEADER_LEN:end])


def unmask_data_header(obfuscation_key: bytes, data: bytes) -> tuple[int, int]:
    """Return ``(session_id, nonce)`` of a data datagram of at least 12 bytes (spec §5)."""
    mask = _hmac_digest(obfuscation_key, _sample(data, DATA_HEADER_LEN), "sha256")
    value = int.from_bytes(data[:DATA_HEADER_LEN], "big") ^ int.from_bytes(mask[:12], "big")
    return value >> 64, value & MAX_NONCE


class DataSealer:
    """Seals frames into data datagrams for one direction of one session (spec §3, §5)."""

    __slots__ = ("_aad", "_encrypt", "_mask", "_sid_shifted")

    def __init__(self, obfuscation_key: bytes, key: bytes, session_id: int) -> None:
        self._mask = _HeaderMask(obfuscation_key)
        self._encrypt = ChaCha20Poly1305(key).encrypt
        self._aad = session_id.to_bytes(4, "big")
        self._sid_shifted = session_id << 64

    def seal(self, nonce: int, frame: bytes) -> bytes:
        """Encrypt ``frame`` under ``nonce`` and return the masked datagram."""
        nonce_bytes = nonce.to_bytes(8, "big")
        ct = self._encrypt(NONCE_PREFIX + nonce_bytes, frame, self._aad)
        # _sample() inlined on this per-datagram path: the calls here and in DataOpener.unmask
        # moved proto_bench's seal+open ratio from about 2.5x to 2.7x
        sample = ct[:MASK_SAMPLE_LEN]
        if len(sample) < MASK_SAMPLE_LEN:
            sample += _ZEROS[len(sample) :]
        mask = self._mask(sample)
        header = (self._sid_shifted | nonce) ^ int.from_bytes(mask[:12], "big")
        return header.to_bytes(DATA_HEADER_LEN, "big") + ct


class DataOpener:
    """Unmasks and decrypts data datagrams for one direction of one session (spec §5)."""

    __slots__ = ("_aad", "_decrypt", "_mask", "session_id")

    def __init__(self, obfuscation_key: bytes, key: bytes, session_id: int) -> None:
        self._mask = _HeaderMask(obfuscation_key)
        self._decrypt = ChaCha20Poly1305(key).decrypt
        self._aad = session_id.to_bytes(4, "big")
        self.session_id = session_id

    def unmask(self, data: bytes) -> int | None:
        """Return the nonce if ``data`` carries this session's id, else None."""
        if len(data) < MIN_DATA_DATAGRAM:
            return None
        # unmask_data_header() inlined on this per-datagram path (see DataSealer.seal)
        sample = data[DATA_HEADER_LEN : DATA_HEADER_LEN + MASK_SAMPLE_LEN]
        if len(sample) < MASK_SAMPLE_LEN:
            sample += _ZEROS[len(sample) :]
        mask = self._mask(sample)
        value = int.from_bytes(data[:DATA_HEADER_LEN], "big") ^ int.from_bytes(mask[:12], "big")
        if value >> 64 != self.session_id:
            return None
        return value & MAX_NONCE

    def decrypt(self, nonce: int, data: bytes) -> bytes | None:
        """Decrypt the ciphertext of a datagram already unmasked; None if it fails to verify."""
        try:
            return self._decrypt(
                # a view: the ciphertext is not copied out of the datagram first
                NONCE_PREFIX + nonce.to_bytes(8, "big"),
                memoryview(data)[DATA_HEADER_LEN:],
                self._aad,
            )
        except InvalidTag:
            return None
