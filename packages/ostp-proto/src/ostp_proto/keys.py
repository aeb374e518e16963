"""Secrets derived from the access key and the transport-key split (spec §2, §3)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

HANDSHAKE_PAD_MIN_FLOOR = 8  # spec §2: effective min = max(pad_min, 8)
HANDSHAKE_PAD_SPREAD_FLOOR = 16  # spec §2: effective max = max(pad_max, pad_min + 16)
INITIATOR_LABEL = b"ostp-initiator"  # spec §3
RESPONDER_LABEL = b"ostp-responder"  # spec §3


@dataclass(frozen=True, slots=True)
class Secrets:
    """Everything an access key determines (spec §2)."""

    obfuscation_key: bytes
    """8-byte HMAC key that masks datagram headers (spec §4, §5)."""
    psk: bytes
    """32-byte Noise pre-shared key (psk0)."""
    handshake_pad_min: int
    """Smallest random padding after a Noise handshake message (inclusive)."""
    handshake_pad_max: int
    """Largest random padding after a Noise handshake message (inclusive)."""

    def __repr__(self) -> str:  # never show key material in logs or tracebacks
        return (
            f"Secrets(handshake_pad_min={self.handshake_pad_min}, "
            f"handshake_pad_max={self.handshake_pad_max}, ...)"
        )


def _hkdf_expand_one_block(prk: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 §2.3 with L <= 32: T(1) = HMAC(prk, info || 0x01) is all we need.
    return hmac.digest(prk, info + b"\x01", "sha256")[:length]


def derive_secrets(access_key: bytes | str) -> Secrets:
    """Derive the obfuscation key, PSK and handshake padding range from an access key.

    The key's UTF-8 bytes are used as they are (spec §2): no hex decoding, no trimming.
    """
    key = access_key.encode() if isinstance(access_key, str) else bytes(access_key)
    kh = hashlib.sha256(key).digest()
    salt, info_base = kh[:16], kh[16:]
    prk = hmac.digest(salt, key, "sha256")
    obfuscation_key = _hkdf_expand_one_block(prk, info_base + b"\x01", 8)
    psk = _hkdf_expand_one_block(prk, info_base + b"\x02", 32)
    pb = _hkdf_expand_one_block(prk, info_base + b"\x03", 2)
    pad_min = 16 + (pb[0] % 64)
    pad_max = pad_min + 48 + (pb[1] % 128)
    pad_min = max(pad_min, HANDSHAKE_PAD_MIN_FLOOR)
    pad_max = max(pad_max, pad_min + HANDSHAKE_PAD_SPREAD_FLOOR)
    return Secrets(obfuscation_key, psk, pad_min, pad_max)


def split_transport_keys(handshake_hash: bytes) -> tuple[bytes, bytes]:
    """Return ``(initiator_key, responder_key)`` from the final Noise hash (spec §3).

    The client sends with the initiator key; the server sends with the responder key.
    """
    return (
        hashlib.sha256(handshake_hash + INITIATOR_LABEL).digest(),
        hashlib.sha256(handshake_hash + RESPONDER_LABEL).digest(),
    )
