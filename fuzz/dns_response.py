"""Fuzz target: arbitrary bytes as a DNS response read by the `direct` outbound's stub resolver.

atheris-compatible (``atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()``); the hypothesis
test in ``tests/client/test_resolver.py`` calls it too. Garbage may only raise
``DnsFormatError``; a response that parses gives well-formed records and a bounded CNAME walk.
"""

from __future__ import annotations

from ostp_client.dns.codec import TYPE_A, TYPE_AAAA, DnsFormatError, parse_response
from ostp_client.dns.resolver import addresses_in


def test_one_input(data: bytes) -> None:
    try:
        response = parse_response(data)
    except DnsFormatError:
        return
    assert 0 <= response.rcode <= 15
    for record in response.answers:
        assert 0 <= record.ttl <= 0x7FFFFFFF
        assert (record.address is None) != (record.target is None)
    for qtype in (TYPE_A, TYPE_AAAA):
        addresses, ttl = addresses_in(response, response.name, qtype)
        assert all(a.version == (4 if qtype == TYPE_A else 6) for a in addresses)
        assert ttl >= 0


if __name__ == "__main__":
    import importlib
    import sys

    atheris = importlib.import_module("atheris")  # optional, untyped

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
