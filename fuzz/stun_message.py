"""Fuzz entry point for the STUN/TURN codec and the socket demultiplexer (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.stun_message import test_one_input;
atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``. Garbage may only produce a
``StunParseError`` from the codec, and nothing at all from the demultiplexer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ostp_client.nat import NatConfig, NatMux, StunParseError, TurnConfig
from ostp_client.nat.stun import (
    Attr,
    decode_channel_data,
    decode_error_code,
    decode_message,
    decode_text,
    decode_u32,
    decode_xor_address,
)

_SERVER = ("127.0.0.1", 3478)
_CONFIG = NatConfig(turn=TurnConfig(server=_SERVER, username="u", password="p"))


def test_one_input(data: bytes) -> None:
    try:
        message = decode_message(data)
    except StunParseError:
        pass
    else:
        message.verify_fingerprint()
        message.verify_integrity(b"key")
        decoders: dict[int, Callable[[bytes], object]] = {
            Attr.XOR_MAPPED_ADDRESS: lambda v: decode_xor_address(v, message.transaction_id),
            Attr.ERROR_CODE: decode_error_code,
            Attr.REALM: decode_text,
            Attr.LIFETIME: decode_u32,
        }
        for attr_type, value in message.attributes:
            decoder = decoders.get(attr_type)
            if decoder is not None:
                with contextlib.suppress(StunParseError):
                    decoder(value)
    with contextlib.suppress(StunParseError):
        decode_channel_data(data)
    # The demultiplexer never raises, whoever sends the datagram.
    mux = NatMux(_CONFIG, urandom=bytes)
    mux.start_turn(("127.0.0.1", 9), now=0.0)
    mux.receive_datagram(data, _SERVER, now=0.0)
    mux.receive_datagram(data, ("127.0.0.1", 9999), now=0.0)
