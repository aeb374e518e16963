"""Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s on `cryptography` and hashlib (spec §3).

Only what OSTP needs: the two handshake messages with psk0, an arbitrary prologue (OSTP uses an
empty one; the public test vectors use "John Galt") and the final handshake hash. The Noise
``split()`` is provided for the test vectors only: OSTP derives its transport keys differently.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
DHLEN = 32
HASHLEN = 32
TAGLEN = 16


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    # Noise §4.3, HMAC-BLAKE2s (block length 64).
    temp = hmac.digest(chaining_key, ikm, hashlib.blake2s)
    out1 = hmac.digest(temp, b"\x01", hashlib.blake2s)
    out2 = hmac.digest(temp, out1 + b"\x02", hashlib.blake2s)
    if outputs == 2:
        return out1, out2
    out3 = hmac.digest(temp, out2 + b"\x03", hashlib.blake2s)
    return out1, out2, out3


def _nonce(n: int) -> bytes:
    # Noise ChaChaPoly: 32 bits of zeros then the 64-bit counter little-endian.
    return b"\x00\x00\x00\x00" + struct.pack("<Q", n)


class CipherState:
    """Noise §5.1."""

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        out = self._aead.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        try:
            out = self._aead.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag as exc:
            raise RemoteProtocolError("noise: authentication failed") from exc
        self.n += 1
        return out


class SymmetricState:
    """Noise §5.2."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise RemoteProtocolError("noise: invalid ephemeral key") from exc


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


class NoiseHandshake:
    """One side of an NN or NNpsk0 handshake with 25519, ChaChaPoly and BLAKE2s.

    ``psk=None`` gives plain ``Noise_NN`` (used only to check the code against the public
    vectors). The ephemeral private key is passed in so randomness stays with the caller.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        ephemeral_private: bytes | None,
        psk: bytes | None,
        prologue: bytes = b"",
    ) -> None:
        if psk is not None and len(psk) != 32:
            raise LocalProtocolError("psk must be 32 bytes")
        name = PROTOCOL_NAME if psk is not None else b"Noise_NN_25519_ChaChaPoly_BLAKE2s"
        self.initiator = initiator
        self._psk = psk
        self._e: X25519PrivateKey | None = None
        self._e_pub = b""
        if ephemeral_private is not None:
            self.set_ephemeral(ephemeral_private)
        self._re: bytes | None = None
        self._ss = SymmetricState(name)
        self._ss.mix_hash(prologue)
        self._step = 0
        self.complete = False

    def set_ephemeral(self, ephemeral_private: bytes) -> None:
        """Set the ephemeral private key (a responder may do this only once msg 1 checks out)."""
        if len(ephemeral_private) != DHLEN:
            raise LocalProtocolError("ephemeral private key must be 32 bytes")
        self._e = X25519PrivateKey.from_private_bytes(ephemeral_private)
        self._e_pub = _public_bytes(self._e)

    def _ephemeral(self) -> X25519PrivateKey:
        if self._e is None:
            raise LocalProtocolError("noise: no ephemeral key set")
        return self._e

    @property
    def handshake_hash(self) -> bytes:
        if not self.complete:
            raise LocalProtocolError("handshake not complete")
        return self._ss.h

    def split(self) -> tuple[bytes, bytes]:
        """Standard Noise split (not used by OSTP; for the vectors)."""
        return self._ss.split()

    def _expect(self, step: int, writing: bool) -> None:
        my_turn = (step == 0) == self.initiator
        if self._step != step or my_turn != writing:
            raise LocalProtocolError("noise: message out of order")

    def write_message_1(self, payload: bytes) -> bytes:
        """Initiator: tokens ``psk, e``."""
        self._expect(0, writing=True)
        self._ephemeral()
        if self._psk is not None:
            self._ss.mix_key_and_hash(self._psk)
        self._ss.mix_hash(self._e_pub)
        if self._psk is not None:
            self._ss.mix_key(self._e_pub)
        out = self._e_pub + self._ss.encrypt_and_hash(payload)
        self._step = 1
        return out

    def read_message_1(self, message: bytes) -> bytes:
        """Responder: read ``psk, e``; returns the payload."""
        self._expect(0, writing=False)
        if len(message) < DHLEN + (TAGLEN if self._psk is not None else 0):
            raise RemoteProtocolError("noise: message 1 too short")
        re = bytes(message[:DHLEN])
        if self._psk is not None:
            self._ss.mix_key_and_hash(self._psk)
        self._ss.mix_hash(re)
        if self._psk is not None:
            self._ss.mix_key(re)
        payload = self._ss.decrypt_and_hash(bytes(message[DHLEN:]))
        self._re = re
        self._step = 1
        return payload

    def write_message_2(self, payload: bytes) -> bytes:
        """Responder: tokens ``e, ee``."""
        self._expect(1, writing=True)
        e = self._ephemeral()
        assert self._re is not None
        self._ss.mix_hash(self._e_pub)
        if self._psk is not None:
            self._ss.mix_key(self._e_pub)
        self._ss.mix_key(_dh(e, self._re))
        out = self._e_pub + self._ss.encrypt_and_hash(payload)
        self._step = 2
        self.complete = True
        return out

    def read_message_2(self, message: bytes) -> bytes:
        """Initiator: read ``e, ee``; returns the payload."""
        self._expect(1, writing=False)
        e = self._ephemeral()
        if len(message) < DHLEN + TAGLEN:
            raise RemoteProtocolError("noise: message 2 too short")
        re = bytes(message[:DHLEN])
        # A forged or corrupted message 2 must not poison the state for the genuine one.
        saved = (self._ss.h, self._ss.ck, self._ss.cipher)
        try:
            self._ss.mix_hash(re)
            if self._psk is not None:
                self._ss.mix_key(re)
            self._ss.mix_key(_dh(e, re))
            payload = self._ss.decrypt_and_hash(bytes(message[DHLEN:]))
        except RemoteProtocolError:
            self._ss.h, self._ss.ck, self._ss.cipher = saved
            raise
        self._re = re
        self._step = 2
        self.complete = True
        return payload
