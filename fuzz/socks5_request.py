"""Fuzz entry point for the hand-written SOCKS5 codec (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.socks5_request import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``. Garbage may only
produce ``None`` (need more bytes), a parsed value, or ``Socks5Error``.
"""

from __future__ import annotations

import contextlib

from ostp_client.inbounds.proxy.socks5 import (
    Socks5Error,
    encode_address,
    encode_udp_packet,
    parse_greeting,
    parse_request,
    parse_udp_packet,
    parse_userpass,
)


def test_one_input(data: bytes) -> None:
    # Each parser on the raw input, then the server's sequence greeting → auth → request on
    # one buffer, as the shell consumes it.
    for parse in (parse_greeting, parse_userpass, parse_request):
        with contextlib.suppress(Socks5Error):
            parse(data)
    try:
        greeting = parse_greeting(data)
        if greeting is None:
            return
        rest = data[greeting[1] :]
        auth = parse_userpass(rest)
        if auth is not None:
            assert 0 < auth[1] <= len(rest)
            rest = rest[auth[1] :]
        request = parse_request(rest)
        if request is not None:
            assert 0 < request[1] <= len(rest)
            encode_address(request[0].target)
    except Socks5Error:
        pass
    try:
        packet = parse_udp_packet(data)
    except Socks5Error:
        return
    again = parse_udp_packet(encode_udp_packet(packet.target, packet.payload))
    assert (again.target, again.payload) == (packet.target, packet.payload)
