"""Fuzz target: arbitrary bytes as a DNS reply read by the `direct` outbound's stub resolver.

atheris-compatible (``atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()``); the hypothesis
tests in ``tests/client/test_resolver.py`` call it too. The stub reads replies with dnspython:
garbage is a dropped reply (None), never an exception; a message that parses gives addresses of
the asked family and a bounded, non-negative TTL.
"""

from __future__ import annotations

import dns.message

from ostp_client.dns.codec import TYPE_A, TYPE_AAAA
from ostp_client.dns.messages import addresses_in, make_query, read_response

QUERY = make_query("www.test", TYPE_A)


def test_one_input(data: bytes) -> None:
    response = read_response(QUERY, data)
    if response is not None:
        assert response.id == QUERY.id
    try:
        message = dns.message.from_wire(data, ignore_trailing=True)
    except Exception:  # what read_response drops
        return
    for qtype in (TYPE_A, TYPE_AAAA):
        addresses, ttl = addresses_in(message, qtype)
        assert all(a.version == (4 if qtype == TYPE_A else 6) for a in addresses)
        assert 0 <= ttl <= 0x7FFFFFFF


if __name__ == "__main__":
    import importlib
    import sys

    atheris = importlib.import_module("atheris")  # optional, untyped

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
