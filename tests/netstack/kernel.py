"""The "kernel" side of the tests: builds IP packets with struct and reads the stack's with dpkt.

Checksums here use ``dpkt.in_cksum`` (a different implementation from the stack's), so a bug
in one is not hidden by the same bug in the other.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Any

import dpkt

from ostp_netstack import NetStack

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def _cksum(data: bytes) -> int:
    return int(dpkt.in_cksum(data))


def ip_packet(
    src: str, dst: str, proto: int, body: bytes, *, ext_header: bool = False, ttl: int = 64
) -> bytes:
    """An IPv4 or IPv6 packet around an already checksummed ``body``."""
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    if len(s) == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, ttl, proto, 0, s, d)
        hdr = hdr[:10] + struct.pack("!H", _cksum(hdr)) + hdr[12:]
        return hdr + body
    nxt = proto
    ext = b""
    if ext_header:
        # A destination options header with one PadN option (RFC 8200 §4.6): 8 bytes.
        ext = struct.pack("!BB", proto, 0) + b"\x01\x04\0\0\0\0"
        nxt = 60
    return struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(body), nxt, ttl, s, d) + ext + body


def pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def tcp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
    *,
    ext_header: bool = False,
    corrupt: bool = False,
) -> bytes:
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    seg = hdr + options + payload
    csum = _cksum(pseudo(src, dst, 6, len(seg)) + seg)
    if corrupt:
        csum ^= 0x0101
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    return ip_packet(src, dst, 6, seg, ext_header=ext_header)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    dgram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = _cksum(pseudo(src, dst, 17, length) + dgram) or 0xFFFF
    dgram = dgram[:6] + struct.pack("!H", csum) + dgram[8:]
    return ip_packet(src, dst, 17, dgram)


@dataclasses.dataclass
class Seg:
    """A TCP segment the stack sent, read back with dpkt (checksums verified)."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    options: list[tuple[int, bytes]]


def verify_checksums(packet: bytes) -> Any:
    """Parse a packet from the stack with dpkt, asserting its checksums; returns the IP object."""
    if packet[0] >> 4 == 4:
        ip: Any = dpkt.ip.IP(packet)
        assert _cksum(packet[:20]) == 0 or dpkt.in_cksum(packet[:20]) == 0
        src, dst = str(ipaddress.ip_address(ip.src)), str(ipaddress.ip_address(ip.dst))
        body = packet[20 : ip.len]
        proto = ip.p
    else:
        ip = dpkt.ip6.IP6(packet)
        src, dst = str(ipaddress.ip_address(ip.src)), str(ipaddress.ip_address(ip.dst))
        body = packet[40 : 40 + ip.plen]
        proto = ip.nxt
    if proto in (6, 17) or (proto == 58):
        assert _cksum(pseudo(src, dst, proto, len(body)) + body) == 0, "bad checksum"
    elif proto == 1:
        assert _cksum(body) == 0
    return ip


def read_tcp(packet: bytes) -> Seg:
    ip = verify_checksums(packet)
    tcp = ip.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    return Seg(
        str(ipaddress.ip_address(ip.src)),
        str(ipaddress.ip_address(ip.dst)),
        tcp.sport,
        tcp.dport,
        tcp.seq,
        tcp.ack,
        tcp.flags,
        tcp.win,
        bytes(tcp.data),
        [o for o in dpkt.tcp.parse_opts(tcp.opts) if o and o[0] > 1],
    )


class Kernel:
    """One TCP connection from the kernel's side: an application at ``src`` dialing ``dst``.

    ``mss`` and ``wscale`` go in the SYN; ``now`` is the virtual clock shared with the stack.
    """

    def __init__(
        self,
        stack: NetStack,
        src: str = "10.0.0.2",
        dst: str = "93.184.216.34",
        sport: int = 40000,
        dport: int = 80,
        *,
        mss: int = 1460,
        wscale: int | None = 7,
        ext_header: bool = False,
    ) -> None:
        self.stack = stack
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.mss = mss
        self.wscale = wscale
        self.ext_header = ext_header
        self.iss = 1_000_000
        self.snd_nxt = self.iss
        self.rcv_nxt = 0
        self.window = 65535
        self.now = 0.0
        self.received = bytearray()
        self.segments: list[Seg] = []

    def packet(
        self, flags: int, payload: bytes = b"", *, seq: int | None = None, **kw: Any
    ) -> bytes:
        return tcp_packet(
            self.src,
            self.dst,
            self.sport,
            self.dport,
            self.snd_nxt if seq is None else seq,
            self.rcv_nxt if flags & ACK else 0,
            flags,
            kw.pop("window", self.window),
            payload,
            ext_header=self.ext_header,
            **kw,
        )

    def feed(self, packet: bytes) -> None:
        self.stack.receive_packet(packet, self.now)

    def flush(self) -> list[Seg]:
        """Segments the stack sent to this connection (others are not expected in tests)."""
        segs = [read_tcp(p) for p in self.stack.packets_to_send(self.now)]
        self.segments.extend(segs)
        return segs

    def syn(self) -> None:
        options = struct.pack("!BBH", 2, 4, self.mss)
        if self.wscale is not None:
            options += struct.pack("!BBBB", 1, 3, 3, self.wscale)
        self.feed(self.packet(SYN, options=options))
        self.snd_nxt += 1

    def handshake_ack(self, synack: Seg) -> None:
        assert synack.flags & (SYN | ACK) == SYN | ACK
        assert synack.ack == self.iss + 1
        self.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
        self.feed(self.packet(ACK))

    def send(self, data: bytes, flags: int = ACK | PSH, **kw: Any) -> None:
        self.feed(self.packet(flags, data, **kw))
        self.snd_nxt = (self.snd_nxt + len(data) + (1 if flags & FIN else 0)) & 0xFFFFFFFF

    def take(self, segs: list[Seg]) -> None:
        """Accept in-order data from the stack's segments (what the kernel would deliver)."""
        for seg in segs:
            if seg.payload and seg.seq == self.rcv_nxt:
                self.received += seg.payload
                self.rcv_nxt = (self.rcv_nxt + len(seg.payload)) & 0xFFFFFFFF
            if seg.flags & FIN and (seg.seq + len(seg.payload)) & 0xFFFFFFFF == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF

    def ack(self, **kw: Any) -> None:
        self.feed(self.packet(ACK, **kw))
