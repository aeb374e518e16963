"""The edge: raw IP packets in, typed and validated representations out; packets built back.

This is the only module that imports dpkt (untyped), so nothing else sees its objects. Parsing
returns a :class:`TcpSegment`, :class:`UdpDatagram` or :class:`IcmpEcho`, or a :class:`Drop`
saying why the packet is unusable; it never raises on garbage. Building uses ``struct`` and the
big-integer checksums of :mod:`ostp_netstack.checksum`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import dpkt

from ostp_netstack.checksum import finish, sum16, verify
from ostp_netstack.stats import Drop

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "IcmpEcho",
    "PacketBuilder",
    "TcpSegment",
    "UdpDatagram",
    "icmp_unreachable",
    "parse_packet",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
_IPV6_FRAGMENT = 44
_IPV6_NO_PAYLOAD_PARSE = frozenset({44, 50, 51})  # fragment, ESP, AH: RFC 8200 §4.5, §4.8

_TCP_OPT_MSS = 2
_TCP_OPT_WSCALE = 3
_TCP_MAX_WSCALE = 14  # RFC 7323 §2.3

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIHHHH")
_UDP = struct.Struct("!HHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")
_HEAD4 = 120
_HEAD6 = 1024


@dataclass(slots=True, eq=False)
class TcpSegment:
    """A TCP segment with a verified checksum."""

    version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None
    wscale: int | None
    payload: bytes
    raw: bytes


@dataclass(slots=True, eq=False)
class UdpDatagram:
    """A UDP datagram with a verified (or absent, IPv4 only) checksum."""

    version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    payload: bytes


@dataclass(slots=True, eq=False)
class IcmpEcho:
    """An ICMP or ICMPv6 echo request."""

    version: int
    src: bytes
    dst: bytes
    ident: int
    sequence: int
    payload: bytes


Parsed = TcpSegment | UdpDatagram | IcmpEcho | Drop


def _pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    # RFC 9293 §3.1 (IPv4), RFC 8200 §8.1 (IPv6): addresses, protocol and upper-layer length.
    return (sum16(src) + sum16(dst) + proto + length) % 0xFFFF


def parse_packet(buf: bytes, checksum_verified: bool = False) -> Parsed:
    """Parse one raw IP packet (no link header) into a typed representation or a drop reason.

    ``checksum_verified`` skips the transport checksum check, for packets whose checksum the
    kernel has already validated or left for offload (virtio-net ``NEEDS_CSUM``).
    """
    if not buf:
        return Drop.IP_TRUNCATED
    version = buf[0] >> 4
    try:
        if version == 4:
            return _parse_ipv4(buf, checksum_verified)
        if version == 6:
            return _parse_ipv6(buf, checksum_verified)
    except (dpkt.Error, struct.error, ValueError, IndexError, KeyError, TypeError, AttributeError):
        # dpkt reports garbage through many exception types; all of them mean "malformed".
        return Drop.IP_MALFORMED
    return Drop.IP_VERSION


def _parse_ipv4(buf: bytes, checksum_verified: bool) -> Parsed:
    if len(buf) < 20:
        return Drop.IP_TRUNCATED
    # dpkt copies payloads while decoding; hand it the headers only (IPv4 and TCP headers are
    # at most 60 bytes each) and slice the payload out of ``buf`` once, below.
    ip: Any = dpkt.ip.IP(buf[:_HEAD4])
    hl = ip.hl * 4
    total = ip.len
    if hl < 20 or total < hl:
        return Drop.IP_MALFORMED
    if total > len(buf) or hl > len(buf):
        return Drop.IP_TRUNCATED
    if not verify(sum16(memoryview(buf)[:hl])):
        return Drop.IP_CHECKSUM
    if ip.mf or ip.offset:
        return Drop.IP_FRAGMENT
    return _parse_transport(4, ip.p, ip.src, ip.dst, buf, hl, total, ip.data, checksum_verified)


def _parse_ipv6(buf: bytes, checksum_verified: bool) -> Parsed:
    if len(buf) < 40:
        return Drop.IP_TRUNCATED
    ip: Any = dpkt.ip6.IP6(buf[:_HEAD6])
    end = 40 + ip.plen
    if ip.plen == 0:
        return Drop.IP_MALFORMED  # jumbograms (RFC 2675) cannot come through a TUN device
    if end > len(buf):
        return Drop.IP_TRUNCATED
    offset = 40
    proto = ip.nxt
    for ext in ip.all_extension_headers:
        offset += ext.length
        proto = getattr(ext, "nxt", None)
        if proto is None:
            break
    if proto in _IPV6_NO_PAYLOAD_PARSE or proto is None:
        return Drop.IP_FRAGMENT if proto == _IPV6_FRAGMENT else Drop.IP_PROTOCOL
    if offset > end:
        return Drop.IP_TRUNCATED
    if offset + 60 > _HEAD6 and len(buf) > _HEAD6:
        ip = dpkt.ip6.IP6(buf)  # long extension headers: decode the whole packet
    data = ip.data if not isinstance(ip.data, bytes) else None
    return _parse_transport(6, proto, ip.src, ip.dst, buf, offset, end, data, checksum_verified)


def _parse_transport(
    version: int,
    proto: int,
    src: bytes,
    dst: bytes,
    buf: bytes,
    start: int,
    end: int,
    decoded: Any,
    checksum_verified: bool,
) -> Parsed:
    length = end - start
    if proto == PROTO_TCP:
        if length < 20:
            return Drop.TCP_TRUNCATED
        if not isinstance(decoded, dpkt.tcp.TCP):
            return Drop.TCP_MALFORMED
        off = decoded.off * 4
        if off < 20 or off > length:
            return Drop.TCP_MALFORMED
        if not checksum_verified and not verify(
            _pseudo_sum(src, dst, PROTO_TCP, length) + sum16(memoryview(buf)[start:end])
        ):
            return Drop.TCP_CHECKSUM
        mss: int | None = None
        wscale: int | None = None
        flags = decoded.flags
        if flags & SYN and off > 20:
            for opt in dpkt.tcp.parse_opts(decoded.opts):
                if opt is None:
                    return Drop.TCP_MALFORMED
                kind, value = opt
                if kind == _TCP_OPT_MSS and len(value) == 2:
                    mss = int.from_bytes(value, "big")
                elif kind == _TCP_OPT_WSCALE and len(value) == 1:
                    wscale = min(value[0], _TCP_MAX_WSCALE)
        return TcpSegment(
            version,
            src,
            dst,
            decoded.sport,
            decoded.dport,
            decoded.seq,
            decoded.ack,
            flags,
            decoded.win,
            mss,
            wscale,
            buf[start + off : end],
            buf,
        )
    if proto == PROTO_UDP:
        if length < 8:
            return Drop.UDP_TRUNCATED
        sport, dport, ulen, csum = _UDP.unpack_from(buf, start)
        if ulen < 8 or ulen > length:
            return Drop.UDP_TRUNCATED
        end = start + ulen
        if csum == 0:
            if version == 6:
                return Drop.UDP_CHECKSUM  # RFC 8200 §8.1: mandatory over IPv6
        elif not checksum_verified and not verify(
            _pseudo_sum(src, dst, PROTO_UDP, ulen) + sum16(memoryview(buf)[start:end])
        ):
            return Drop.UDP_CHECKSUM
        return UdpDatagram(version, src, dst, sport, dport, buf[start + 8 : end])
    if (proto == PROTO_ICMP and version == 4) or (proto == PROTO_ICMPV6 and version == 6):
        if length < 8:
            return Drop.ICMP_TRUNCATED
        kind, code, _csum, ident, sequence = _ICMP_ECHO.unpack_from(buf, start)
        total = sum16(memoryview(buf)[start:end])
        if version == 6:
            total += _pseudo_sum(src, dst, PROTO_ICMPV6, length)
        if not verify(total):
            return Drop.ICMP_CHECKSUM
        if (version == 4 and kind == 8 and code == 0) or (version == 6 and kind == 128):
            return IcmpEcho(version, src, dst, ident, sequence, buf[start + 8 : end])
        return Drop.ICMP_UNHANDLED
    return Drop.IP_PROTOCOL


class PacketBuilder:
    """Precomputed headers for one direction of one address pair (stack to kernel).

    ``src`` is the remote host the stack impersonates, ``dst`` the local application. With
    ``checksum_offload`` the transport checksum field holds only the folded pseudo-header sum,
    as virtio-net ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` expects; the kernel completes it.
    """

    __slots__ = ("_dst", "_ip4_sum", "_offload", "_pseudo", "_src", "_ttl", "_version")

    def __init__(self, src: bytes, dst: bytes, ttl: int, checksum_offload: bool) -> None:
        self._src = src
        self._dst = dst
        self._ttl = ttl
        self._version = 4 if len(src) == 4 else 6
        self._offload = checksum_offload
        self._pseudo = (sum16(src) + sum16(dst)) % 0xFFFF
        # Constant IPv4 header words (version/IHL, DF, TTL) plus the addresses.
        self._ip4_sum = (0x4500 + 0x4000 + (ttl << 8) + self._pseudo) % 0xFFFF

    @property
    def header_len(self) -> int:
        """Bytes of IP header in front of the transport header."""
        return 20 if self._version == 4 else 40

    def _ip(self, proto: int, length: int) -> bytes:
        if self._version == 4:
            total = 20 + length
            csum = finish(self._ip4_sum + proto + total)
            return _IP4.pack(
                0x45, 0, total, 0, 0x4000, self._ttl, proto, csum, self._src, self._dst
            )
        return _IP6.pack(0x60000000, length, proto, self._ttl, self._src, self._dst)

    def _transport_checksum(self, proto: int, length: int, header: bytes, payload: Any) -> int:
        pseudo = self._pseudo + proto + length
        if self._offload:
            folded = pseudo % 0xFFFF
            return folded or 0xFFFF
        return finish(pseudo + sum16(header) + (sum16(payload) if payload else 0))

    def tcp(
        self,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
    ) -> bytes:
        """One TCP segment as a complete IP packet."""
        off_flags = ((20 + len(options)) << 10) | flags
        header = _TCP.pack(sport, dport, seq, ack, off_flags, window, 0, 0) + options
        length = len(header) + len(payload)
        csum = self._transport_checksum(PROTO_TCP, length, header, payload)
        header = _TCP.pack(sport, dport, seq, ack, off_flags, window, csum, 0) + options
        return b"".join((self._ip(PROTO_TCP, length), header, payload))

    def udp(self, sport: int, dport: int, payload: bytes) -> bytes:
        """One UDP datagram as a complete IP packet."""
        length = 8 + len(payload)
        header = _UDP.pack(sport, dport, length, 0)
        csum = self._transport_checksum(PROTO_UDP, length, header, payload)
        return b"".join(
            (self._ip(PROTO_UDP, length), _UDP.pack(sport, dport, length, csum), payload)
        )

    def icmp(self, kind: int, code: int, rest: bytes, payload: bytes) -> bytes:
        """An ICMP (IPv4) or ICMPv6 message; ``rest`` is the 4 bytes after the checksum."""
        header = struct.pack("!BBH", kind, code, 0) + rest
        length = len(header) + len(payload)
        if self._version == 4:
            proto = PROTO_ICMP
            csum = finish(sum16(header) + sum16(payload))
        else:
            proto = PROTO_ICMPV6
            csum = finish(self._pseudo + proto + length + sum16(header) + sum16(payload))
        header = struct.pack("!BBH", kind, code, csum) + rest
        return b"".join((self._ip(proto, length), header, payload))


def icmp_unreachable(builder: PacketBuilder, original: bytes) -> bytes:
    """ICMP host unreachable (RFC 792) or ICMPv6 address unreachable (RFC 4443 §3.1)."""
    if builder.header_len == 20:
        return builder.icmp(3, 1, b"\0\0\0\0", original[:548])
    return builder.icmp(1, 3, b"\0\0\0\0", original[:1232])
