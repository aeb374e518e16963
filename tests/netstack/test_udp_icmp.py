"""UDP flows, ICMP echo and IPv6 UDP through the stack."""

from __future__ import annotations

import struct

import dpkt
import pytest

from ostp_netstack import (
    Endpoint,
    LocalProtocolError,
    NetStack,
    NetStackConfig,
    UdpDatagramReceived,
    UdpFlowExpired,
)
from tests.netstack.kernel import _cksum, ip_packet, udp_packet, verify_checksums


def test_udp_flow_roundtrip_and_expiry() -> None:
    stack = NetStack(NetStackConfig(udp_idle_timeout=30.0))
    stack.receive_packet(udp_packet("10.0.0.2", "8.8.8.8", 5353, 53, b"query"), 1.0)
    stack.receive_packet(udp_packet("10.0.0.2", "8.8.8.8", 5353, 53, b"again"), 2.0)
    e1, e2 = stack.next_event(), stack.next_event()
    assert e1 == UdpDatagramReceived(
        1, Endpoint("10.0.0.2", 5353), Endpoint("8.8.8.8", 53), b"query"
    )
    assert isinstance(e2, UdpDatagramReceived) and e2.flow_id == 1 and e2.data == b"again"
    assert stack.udp_send(1, b"answer")
    [pkt] = stack.packets_to_send(2.0)
    ip = verify_checksums(pkt)
    assert (ip.src, ip.dst) == (bytes([8, 8, 8, 8]), bytes([10, 0, 0, 2]))
    assert (ip.data.sport, ip.data.dport, ip.data.data) == (53, 5353, b"answer")
    assert stack.get_timer() == 31.0
    stack.handle_timer(31.0)  # activity at 2.0 pushed the expiry to 32.0
    assert stack.next_event() is None
    assert stack.get_timer() == 32.0
    stack.handle_timer(32.0)
    assert stack.next_event() == UdpFlowExpired(1)
    assert stack.stats.udp_flows_expired == 1 and stack.stats.udp_flows_active == 0
    with pytest.raises(LocalProtocolError):
        stack.udp_send(1, b"late")


def test_udp_flows_are_per_five_tuple_and_bounded() -> None:
    stack = NetStack(NetStackConfig(udp_max_flows=2))
    for sport in (1000, 1001, 1002):
        stack.receive_packet(udp_packet("10.0.0.2", "1.1.1.1", sport, 53, b"q"), 0.0)
    events = [stack.next_event(), stack.next_event(), stack.next_event()]
    assert [e.flow_id for e in events if isinstance(e, UdpDatagramReceived)] == [1, 2]
    assert stack.stats.udp_flow_limit_drop == 1


def test_udp_ipv6_and_send_from_any_source() -> None:
    stack = NetStack()
    stack.receive_packet(udp_packet("fd00::2", "2001:db8::53", 4000, 53, b"v6"), 0.0)
    event = stack.next_event()
    assert isinstance(event, UdpDatagramReceived)
    assert event.dst == Endpoint("2001:db8::53", 53)
    assert stack.udp_send_from(Endpoint("2001:db8::99", 123), event.src, b"full cone")
    [pkt] = stack.packets_to_send(0.0)
    ip = verify_checksums(pkt)
    assert ip.data.data == b"full cone"


def test_udp_bad_checksum_and_truncation_are_counted() -> None:
    stack = NetStack()
    good = udp_packet("10.0.0.2", "8.8.8.8", 1, 2, b"payload")
    bad = bytearray(good)
    bad[-1] ^= 1
    stack.receive_packet(bytes(bad), 0.0)
    assert stack.stats.udp_checksum_drop == 1
    short = bytearray(good)
    short[24:26] = struct.pack("!H", 200)  # UDP length beyond the packet
    stack.receive_packet(bytes(short), 0.0)
    assert stack.stats.udp_truncated_drop == 1
    zero = bytearray(udp_packet("fd00::2", "fd00::1", 1, 2, b"x"))
    zero[46:48] = b"\0\0"  # no checksum: forbidden over IPv6
    stack.receive_packet(bytes(zero), 0.0)
    assert stack.stats.udp_checksum_drop == 2
    assert stack.next_event() is None


def test_udp_reply_too_big_is_refused() -> None:
    stack = NetStack(NetStackConfig(mtu=1500))
    stack.receive_packet(udp_packet("10.0.0.2", "8.8.8.8", 1, 2, b"q"), 0.0)
    assert stack.udp_send(1, bytes(1472))
    assert not stack.udp_send(1, bytes(1473))
    assert stack.stats.udp_too_big_drop == 1


def _echo(src: str, dst: str, v6: bool) -> bytes:
    kind = 128 if v6 else 8
    body = struct.pack("!BBHHH", kind, 0, 0, 7, 1) + b"ping!"
    if v6:
        from tests.netstack.kernel import pseudo

        csum = _cksum(pseudo(src, dst, 58, len(body)) + body)
    else:
        csum = _cksum(body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return ip_packet(src, dst, 58 if v6 else 1, body)


@pytest.mark.parametrize(
    ("src", "dst", "v6"), [("10.0.0.2", "9.9.9.9", False), ("fd00::2", "2001:db8::1", True)]
)
def test_icmp_echo_answered_only_when_enabled(src: str, dst: str, v6: bool) -> None:
    off = NetStack()
    off.receive_packet(_echo(src, dst, v6), 0.0)
    assert off.packets_to_send(0.0) == []
    assert off.stats.icmp_unhandled_drop == 1
    on = NetStack(NetStackConfig(icmp_echo_reply=True))
    on.receive_packet(_echo(src, dst, v6), 0.0)
    [reply] = on.packets_to_send(0.0)
    ip = verify_checksums(reply)
    icmp = ip.data
    assert isinstance(icmp, dpkt.icmp.ICMP | dpkt.icmp6.ICMP6)
    assert icmp.type == (129 if v6 else 0)
    assert reply.endswith(b"ping!")


def test_packets_in_reused_buffers_are_copied() -> None:
    stack = NetStack()
    buf = bytearray(udp_packet("10.0.0.2", "8.8.8.8", 1, 2, b"first"))
    stack.receive_packet(memoryview(buf), 0.0)
    buf[:] = bytes(len(buf))  # the shell reuses its receive buffer
    event = stack.next_event()
    assert isinstance(event, UdpDatagramReceived) and event.data == b"first"
