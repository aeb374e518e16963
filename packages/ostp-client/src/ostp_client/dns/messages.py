"""DNS messages for the stub resolver (`ostp_client.dns.resolver`), built and read by dnspython.

A module of its own so that dnspython is imported with the first query the stub resolver sends,
not with the daemon (about 64 ms of its start and 1.5 MB of its memory): most daemons never send
one (the resolver is used only while a routing mark is in effect).
"""

from __future__ import annotations

import ipaddress
import secrets

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

__all__ = ["addresses_in", "make_query", "read_response"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IDNA = dns.name.IDNA_2008_Practical


def make_query(name: str, qtype: int) -> dns.message.QueryMessage:
    """A recursive query for ``name`` (IDNA-encoded); ValueError for a name DNS cannot carry
    (RFC 1035 §2.3.4 limits, an empty label, a name IDNA refuses)."""
    try:
        qname = dns.name.from_text(name, origin=dns.name.root, idna_codec=_IDNA)
        return dns.message.make_query(
            qname, dns.rdatatype.RdataType(qtype), use_edns=False, id=secrets.randbits(16)
        )
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise ValueError(f"{name}: not a name DNS can carry ({exc})") from None


def read_response(query: dns.message.Message, data: bytes) -> dns.message.Message | None:
    """The reply in ``data`` when it answers ``query`` (id, flags, question), else None."""
    try:
        response = dns.message.from_wire(data, ignore_trailing=True)
    except Exception:  # anything dnspython cannot read is a malformed reply, dropped
        return None
    try:
        return response if query.is_response(response) else None
    except Exception:
        return None


def addresses_in(response: dns.message.Message, qtype: int) -> tuple[list[IPAddress], int]:
    """The ``qtype`` addresses of the question's name, CNAMEs followed, and the smallest TTL
    along the chain (0 when there is nothing; a TTL with the top bit set counts as 0,
    RFC 2181 §8)."""
    if not isinstance(response, dns.message.QueryMessage):
        return [], 0
    try:
        chain = response.resolve_chaining()
    except (dns.exception.DNSException, KeyError):  # no question, a loop too long, ...
        return [], 0
    answer = chain.answer
    if answer is None or int(answer.rdtype) != qtype:
        return [], 0
    addresses: list[IPAddress] = []
    for rdata in answer:
        try:
            addresses.append(ipaddress.ip_address(str(getattr(rdata, "address", ""))))
        except (AttributeError, ValueError):
            continue
    if not addresses:
        return [], 0
    ttls = [rrset.ttl for rrset in (*chain.cnames, answer)]
    return addresses, min(0 if ttl & 0x80000000 else ttl for ttl in ttls)
