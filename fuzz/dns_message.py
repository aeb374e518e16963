"""Fuzz target: arbitrary bytes as a DNS query hijacked by the TUN inbound.

atheris-compatible (``atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()``); the hypothesis
test in ``tests/client/test_tun_units.py`` calls it too. Garbage may only raise
``DnsFormatError``; a query that parses must give answers that parse back.
"""

from __future__ import annotations

import struct

from ostp_client.dns.codec import DnsFormatError, FakeIpPool, build_answer, build_error, parse_query

_POOL = FakeIpPool("198.18.0.0/15", "fc00::/18", exclude=["198.18.0.0/30"], capacity=64)


def test_one_input(data: bytes) -> None:
    try:
        query = parse_query(data)
    except DnsFormatError:
        return
    address = _POOL.address_for(query.name or ".", 4 if query.qtype != 28 else 6)
    for reply in (build_answer(query, [address] if address else []), build_error(query)):
        ident, flags = struct.unpack_from("!HH", reply)
        assert ident == query.id and flags & 0x8000
        assert reply[12 : 12 + len(query.question)] == query.question
    assert address is None or _POOL.lookup(address) == (query.name or ".")


if __name__ == "__main__":
    import importlib
    import sys

    atheris = importlib.import_module("atheris")  # optional, untyped

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
