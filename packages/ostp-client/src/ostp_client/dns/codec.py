"""DNS for the TUN inbound: just enough of the wire format (RFC 1035) and the fake-IP pool.

Hijacked queries are either forwarded through the routed outbound (the answer comes back
unchanged), or, in fake-IP mode, A/AAAA questions are answered here with an address from a
reserved range that maps back to the name; a connection to that address is then routed by
name, so domain rules apply to TUN traffic.

`parse_query` faces the network: bad input raises `DnsFormatError` only.

Hand-written rather than dnspython (which `ostp_client.dns.resolver` uses): this runs for every
hijacked query on the TUN's path and needs only the question and a few A/AAAA records, echoing
the question's bytes unchanged; a fixed header, one name and `struct` do that without building
a full message object per query, and its only failure is `DnsFormatError` (fuzzed by
``fuzz/dns_message.py``). Sans-IO: no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ostp_client.errors import OstpClientError

__all__ = [
    "CLASS_IN",
    "TYPE_A",
    "TYPE_AAAA",
    "DnsFormatError",
    "DnsQuery",
    "FakeIpPool",
    "build_answer",
    "build_error",
    "parse_query",
]

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_FORMERR = 1  # RFC 1035 §4.1.1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_RA = 0x0080
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH after the owner name (RFC 1035 §4.1.3)
_MAX_NAME = 255  # RFC 1035 §2.3.4
_MAX_LABEL = 63

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DnsFormatError(OstpClientError, ValueError):
    """Not a DNS query this module can read."""


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A parsed query: header fields and its first question."""

    id: int
    flags: int
    name: str
    """Lower-case, without the trailing dot; "" for the root."""
    qtype: int
    qclass: int
    question: bytes
    """The question as it was on the wire (echoed in answers)."""
    qdcount: int

    @property
    def opcode(self) -> int:
        return (self.flags & _OPCODE_MASK) >> 11


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` and the offset after it (compression pointers followed)."""
    labels: list[str] = []
    end: int | None = None
    length = 0
    jumps = 0
    while True:
        if offset >= len(data):
            raise DnsFormatError("name runs past the end")
        size = data[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsFormatError("truncated compression pointer")
            jumps += 1
            if jumps > 16:
                raise DnsFormatError("compression pointer loop")
            if end is None:
                end = offset + 2
            offset = ((size & 0x3F) << 8) | data[offset + 1]
            continue
        if size & 0xC0:
            raise DnsFormatError("reserved label type")
        offset += 1
        if size == 0:
            break
        if size > _MAX_LABEL or offset + size > len(data):
            raise DnsFormatError("bad label length")
        length += size + 1
        if length > _MAX_NAME:
            raise DnsFormatError("name too long")
        labels.append(data[offset : offset + size].decode("ascii", "replace").lower())
        offset += size
    return ".".join(labels), end if end is not None else offset


def parse_query(data: bytes) -> DnsQuery:
    """Parse a DNS query's header and first question; raise `DnsFormatError`."""
    if len(data) < _HEADER.size:
        raise DnsFormatError("shorter than a DNS header")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DnsFormatError("a response, not a query")
    if qdcount < 1:
        raise DnsFormatError("no question")
    name, offset = _read_name(data, _HEADER.size)
    if offset + 4 > len(data):
        raise DnsFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    question = data[_HEADER.size : offset + 4]
    return DnsQuery(ident, flags, name, qtype, qclass, question, qdcount)


def build_answer(query: DnsQuery, addresses: Iterable[IPAddress], ttl: int = 1) -> bytes:
    """A NOERROR response to ``query`` with A/AAAA records (none makes an empty answer)."""
    records = []
    for address in addresses:
        rtype = TYPE_A if address.version == 4 else TYPE_AAAA
        rdata = address.packed
        # name: pointer to the question's name at offset 12 (RFC 1035 §4.1.4)
        records.append(struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN, ttl, len(rdata)) + rdata)
    flags = _QR | (query.flags & (_OPCODE_MASK | _RD)) | _RA
    header = _HEADER.pack(query.id, flags, 1, len(records), 0, 0)
    return header + query.question + b"".join(records)


def build_error(query: DnsQuery, rcode: int = RCODE_SERVFAIL) -> bytes:
    """A response with ``rcode`` and no records."""
    flags = _QR | (query.flags & (_OPCODE_MASK | _RD)) | _RA | (rcode & 0xF)
    return _HEADER.pack(query.id, flags, 1, 0, 0, 0) + query.question


class FakeIpPool:
    """Names ↔ addresses from reserved ranges, least recently used reused first.

    ``exclude`` (the TUN's own networks) is never handed out; nor are a range's first and last
    address.
    """

    def __init__(
        self,
        v4_range: str,
        v6_range: str | None = None,
        exclude: Iterable[str] = (),
        capacity: int = 65536,
    ) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.ip_network(v4_range, strict=False)
        ]
        if v6_range is not None:
            self.networks.append(ipaddress.ip_network(v6_range, strict=False))
        self._exclude = [ipaddress.ip_network(e, strict=False) for e in exclude]
        self._capacity = capacity
        self._by_name: dict[int, OrderedDict[str, IPAddress]] = {4: OrderedDict(), 6: OrderedDict()}
        self._by_ip: dict[IPAddress, str] = {}
        self._next: dict[int, int] = {4: 1, 6: 1}

    def network(self, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        for net in self.networks:
            if net.version == version:
                return net
        return None

    def contains(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks)

    def address_for(self, name: str, version: int = 4) -> IPAddress | None:
        """The fake address of ``name`` (allocated on first use), or None without a range."""
        names = self._by_name[version]
        address = names.get(name)
        if address is not None:
            names.move_to_end(name)
            return address
        net = self.network(version)
        if net is None:
            return None
        size = net.num_addresses
        limit = min(self._capacity, size - 2)
        if len(names) >= limit:
            _, address = names.popitem(last=False)
        else:
            address = None
            for _ in range(size):
                offset = self._next[version]
                self._next[version] = offset + 1 if offset + 1 < size - 1 else 1
                candidate = net.network_address + offset
                if candidate in self._by_ip or any(candidate in e for e in self._exclude):
                    continue
                address = candidate
                break
            if address is None:
                _, address = names.popitem(last=False)  # pragma: no cover - all excluded
        old = self._by_ip.get(address)
        if old is not None:
            names.pop(old, None)
        names[name] = address
        self._by_ip[address] = name
        return address

    def lookup(self, address: str | IPAddress) -> str | None:
        """The name a fake address stands for, or None."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return None
        name = self._by_ip.get(ip)
        if name is not None:
            self._by_name[ip.version].move_to_end(name)
        return name
