"""Regression tests for bugs the property, fuzz and peer tests found in ostp_proto."""

from __future__ import annotations

import random

from ostp_proto import ClientConnection, ServerAcceptor, derive_secrets
from ostp_proto.noise import NoiseHandshake
from ostp_proto.obfuscation import build_handshake_datagram

KEY = "0123456789abcdef0123456789abcdef"
UNIX = 1_700_000_000.0


def test_acceptor_never_raises_for_a_low_order_ephemeral_key() -> None:
    # A holder of the access key sends message 1 whose ephemeral public key is the all-zero
    # (low-order) point. Message 1 itself authenticates (psk0 keys it), so the acceptor gets
    # as far as building message 2, where X25519 refuses the point. accept() must return None.
    secrets = derive_secrets(KEY)
    initiator = NoiseHandshake(initiator=True, ephemeral_private=bytes(range(32)), psk=secrets.psk)
    initiator._e_pub = bytes(32)  # the low-order point instead of our real public key
    payload = int(UNIX).to_bytes(8, "big") + (7).to_bytes(4, "big") + KEY.encode()
    datagram = build_handshake_datagram(
        secrets.obfuscation_key, 7, initiator.write_message_1(payload), bytes(40)
    )
    acceptor = ServerAcceptor([KEY])
    assert acceptor.accept(datagram, 0.0, UNIX) is None


def test_client_accepts_genuine_message_2_after_a_corrupted_copy() -> None:
    # A corrupted copy of message 2 (one bit flipped in its AEAD tag: the masked header, which
    # depends only on the ephemeral key, still matches) arrives before the genuine one, as a
    # duplicating, corrupting link can deliver. The genuine copy must complete the handshake.
    client = ClientConnection(access_key=KEY, random_bytes=random.Random(1).randbytes)
    client.connect(0.0, UNIX)
    [datagram1] = client.datagrams_to_send(0.0)
    server = ServerAcceptor([KEY]).accept(datagram1, 0.0, UNIX)
    assert server is not None
    [datagram2] = server.datagrams_to_send(0.0)
    corrupted = bytearray(datagram2)
    corrupted[6 + 40] ^= 0x01  # inside the 16-byte tag of the 48-byte Noise message 2
    client.receive_datagram(bytes(corrupted), 0.010)
    assert not client.established
    client.receive_datagram(datagram2, 0.011)
    assert client.established
