"""TCP through the stack against a scripted kernel peer, on a virtual clock."""

from __future__ import annotations

from typing import Any

import pytest

from ostp_netstack import (
    Endpoint,
    Event,
    LocalProtocolError,
    NetStack,
    NetStackConfig,
    TcpConnectionClosed,
    TcpConnectionEstablished,
    TcpConnectionRequested,
    TcpConnectionReset,
    TcpDataReceived,
    TcpPeerClosed,
    TcpSendReady,
)
from tests.netstack.kernel import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Kernel,
    _cksum,
    pseudo,
    read_tcp,
    tcp_packet,
)


def drain(stack: NetStack) -> list[Event]:
    events = []
    while (event := stack.next_event()) is not None:
        events.append(event)
    return events


def connect(stack: NetStack | None = None, **kw: Any) -> tuple[Kernel, int]:
    stack = stack or NetStack(random=lambda n: b"\x10\x20\x30\x40"[:n])
    k = Kernel(stack, **kw)
    k.syn()
    req = requested(stack)
    assert isinstance(req, TcpConnectionRequested)
    stack.tcp_accept(req.conn_id)
    [synack] = k.flush()
    k.handshake_ack(synack)
    assert drain(stack) == [TcpConnectionEstablished(req.conn_id)]
    return k, req.conn_id


def requested(stack: NetStack) -> TcpConnectionRequested:
    [event] = drain(stack)
    assert isinstance(event, TcpConnectionRequested)
    return event


def received(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, TcpDataReceived))


def test_handshake_offers_connection_and_negotiates_options() -> None:
    stack = NetStack(NetStackConfig(mtu=9000), random=lambda n: b"\xff\xff\xff\xf0"[:n])
    k = Kernel(stack, dst="203.0.113.9", dport=443, mss=8960, wscale=7)
    k.syn()
    req = requested(stack)
    assert req == TcpConnectionRequested(
        1, Endpoint("10.0.0.2", 40000), Endpoint("203.0.113.9", 443)
    )
    assert stack.packets_to_send(0.0) == []  # nothing until the application decides
    stack.tcp_accept(req.conn_id)
    [synack] = k.flush()
    assert (synack.src, synack.sport, synack.dst, synack.dport) == (
        "203.0.113.9",
        443,
        "10.0.0.2",
        40000,
    )
    assert synack.seq == 0xFFFFFFF0
    opts = dict(synack.options)
    assert int.from_bytes(opts[2], "big") == 8960  # MSS = MTU - 40
    assert opts[3][0] > 0  # window scaling answered
    k.handshake_ack(synack)
    assert drain(stack) == [TcpConnectionEstablished(1)]
    assert stack.tcp_state(1) == "ESTABLISHED"


def test_no_window_scaling_when_syn_lacks_it() -> None:
    k, _conn = connect(wscale=None)
    synack = k.segments[0]
    assert 3 not in dict(synack.options)
    k.send(b"x")
    [ack] = k.flush()
    assert ack.window == 65535 - 1  # capped at 65535, unscaled; one byte unconsumed


def test_data_both_ways_with_sequence_wraparound() -> None:
    stack = NetStack(random=lambda n: b"\xff\xff\xff\x00"[:n])  # our ISS wraps quickly
    k, conn = connect(stack, mss=1000)
    k.snd_nxt = k.snd_nxt  # kernel side: plain
    k.send(b"hello ")
    k.send(b"world")
    assert received(drain(stack)) == b"hello world"
    [ack] = k.flush()
    assert ack.ack == k.snd_nxt and not ack.payload  # one ACK for the batch
    data = bytes(range(256)) * 20  # 5120 bytes: crosses 2**32 in our sequence space
    assert stack.tcp_send(conn, data) == len(data)
    segs = k.flush()
    assert [len(s.payload) for s in segs] == [1000] * 5 + [120]
    assert segs[-1].flags & PSH
    k.take(segs)
    k.ack()
    assert bytes(k.received) == data
    assert k.flush() == []
    assert stack.stats.tcp_bytes_sent == len(data)
    assert stack.stats.buffered_bytes == 11  # the unconsumed "hello world"
    stack.tcp_consumed(conn, 11)
    assert stack.stats.buffered_bytes == 0


def test_refuse_with_rst_and_with_icmp() -> None:
    stack = NetStack()
    k = Kernel(stack)
    k.syn()
    req = requested(stack)
    stack.tcp_refuse(req.conn_id)
    [rst] = k.flush()
    assert rst.flags & (RST | ACK) == RST | ACK and rst.ack == k.iss + 1
    assert stack.tcp_state(req.conn_id) is None
    k2 = Kernel(stack, sport=40001)
    k2.syn()
    req2 = requested(stack)
    stack.tcp_refuse(req2.conn_id, icmp=True)
    [pkt] = stack.packets_to_send(0.0)
    assert pkt[9] == 1 and pkt[20] == 3 and pkt[21] == 1  # ICMP host unreachable
    assert pkt[28 + 20 : 28 + 22] == (40001).to_bytes(2, "big")  # quotes the SYN
    with pytest.raises(LocalProtocolError):
        stack.tcp_accept(req2.conn_id)


def test_segment_for_unknown_connection_gets_rst() -> None:
    stack = NetStack()
    k = Kernel(stack)
    k.rcv_nxt = 777
    k.feed(k.packet(ACK, b"data"))
    [rst] = k.flush()
    assert rst.flags == RST and rst.seq == 777
    assert stack.stats.tcp_no_connection_drop == 1
    k.feed(k.packet(RST))
    assert k.flush() == []  # never answer a RST
    assert stack.stats.tcp_no_connection_drop == 2


def test_loss_is_repaired_by_retransmission_timeout() -> None:
    k, conn = connect(mss=1000)
    stack = k.stack
    stack.tcp_send(conn, b"a" * 3000)
    segs = k.flush()
    assert len(segs) == 3
    k.take(segs[:1])  # the second segment is lost; the third arrives after the hole
    k.ack()
    k.ack()  # duplicate ack for the third
    assert k.flush() == []
    deadline = stack.get_timer()
    assert deadline is not None and deadline <= 1.0
    k.now = deadline
    stack.handle_timer(k.now)
    [again] = k.flush()
    assert again.seq == segs[1].seq and len(again.payload) == 1000
    assert stack.stats.tcp_timeouts == 1
    k.take([again, segs[2]])
    k.ack()
    k.flush()
    assert bytes(k.received) == b"a" * 3000
    assert stack.get_timer() is None  # nothing outstanding: no retransmission timer


def test_fast_retransmit_after_three_duplicate_acks() -> None:
    k, conn = connect(mss=1000)
    stack = k.stack
    stack.tcp_send(conn, bytes(6000))
    segs = k.flush()
    assert len(segs) == 6
    k.take(segs[:1])
    k.ack()
    for _ in range(3):
        k.ack()  # segments 3, 4, 5 arrived after a hole at segment 2
    [fast] = k.flush()
    assert fast.seq == segs[1].seq
    assert stack.stats.tcp_fast_retransmits == 1
    k.take([fast, *segs[2:]])
    k.ack()
    k.flush()
    assert len(k.received) == 6000


def test_rtt_sample_sets_retransmission_timeout() -> None:
    k, conn = connect(mss=1000)
    stack = k.stack
    stack.tcp_send(conn, bytes(1000))
    k.take(k.flush())
    k.now = 0.05
    k.ack()
    stack.tcp_send(conn, bytes(1000))
    k.flush()
    deadline = stack.get_timer()
    assert deadline is not None and 0.05 + 0.2 <= deadline < 0.05 + 1.0  # RTO from the sample


def test_out_of_order_segments_are_reassembled() -> None:
    k, _conn = connect()
    stack = k.stack
    base = k.snd_nxt
    parts = [bytes([i]) * 100 for i in range(5)]
    order = [3, 1, 4, 0, 2]
    for i in order:
        k.feed(k.packet(ACK, parts[i], seq=base + 100 * i))
        k.feed(k.packet(ACK, parts[i], seq=base + 100 * i))  # duplicates too
    assert received(drain(stack)) == b"".join(parts)
    segs = k.flush()
    assert segs[-1].ack == base + 500
    assert any(s.ack == base for s in segs)  # duplicate ACKs went out for the hole
    assert stack.stats.buffered_bytes == 500


def test_reassembly_limit_counts_drops() -> None:
    k, _conn = connect(stack=NetStack(NetStackConfig(tcp_max_out_of_order_segments=2)))
    base = k.snd_nxt
    for i in range(1, 5):
        k.feed(k.packet(ACK, b"z" * 10, seq=base + 10 * i))
    assert k.stack.stats.tcp_reassembly_limit_drop == 2


def test_receive_window_shrinks_until_consumed_and_reopens() -> None:
    cfg = NetStackConfig(tcp_receive_buffer=4000)
    k, conn = connect(NetStack(cfg), wscale=None)
    stack = k.stack
    k.send(b"x" * 1460)
    k.send(b"x" * 1460)
    [ack] = k.flush()
    assert ack.window == 4000 - 2920
    k.send(b"y" * 1460)  # beyond the window: only 1080 bytes are taken
    assert len(received(drain(stack))) == 2920 + 1080
    [ack] = k.flush()
    assert ack.window == 0
    assert ack.ack == k.snd_nxt - 380
    k.snd_nxt = ack.ack
    k.send(b"p")  # zero-window probe: not accepted, answered with the same ACK
    [ack] = k.flush()
    assert ack.window == 0 and ack.ack == k.snd_nxt - 1
    assert stack.stats.tcp_out_of_window_drop == 1
    stack.tcp_consumed(conn, 4000)
    [update] = k.flush()  # window update once the application caught up
    assert update.window == 4000


def test_zero_window_from_peer_is_probed() -> None:
    k, conn = connect(mss=1000)
    stack = k.stack
    stack.tcp_send(conn, bytes(3000))
    segs = k.flush()
    k.take(segs[:2])
    k.ack(window=0)  # the application stopped reading
    assert k.flush() == []
    t1 = stack.get_timer()
    assert t1 is not None
    k.now = t1
    stack.handle_timer(k.now)
    [probe] = k.flush()
    assert not probe.payload and probe.seq == k.rcv_nxt - 1  # old sequence: forces an ACK
    assert stack.stats.tcp_window_probes == 1
    k.ack(window=0)  # the answer: still closed
    t2 = stack.get_timer()
    assert t2 is not None and t2 - t1 > t1  # backed off
    stack.handle_timer(t2)
    assert len(k.flush()) == 1
    k.ack(window=8)  # reopens (8 << 7 bytes): the segment dropped meanwhile goes again
    segs = k.flush()
    assert [len(s.payload) for s in segs] == [1000]
    assert segs[0].seq == k.rcv_nxt
    k.take(segs)
    k.ack(window=65535)
    k.take(k.flush())
    k.ack()
    assert len(k.received) == 3000


def test_send_buffer_backpressure() -> None:
    k, conn = connect(NetStack(NetStackConfig(tcp_send_buffer=5000)), mss=1000)
    stack = k.stack
    assert stack.tcp_send(conn, bytes(8000)) == 5000
    assert stack.tcp_send_capacity(conn) == 0
    segs = k.flush()
    k.take(segs)
    k.ack()
    assert TcpSendReady(conn) in drain(stack)
    assert stack.tcp_send_capacity(conn) == 5000


def test_close_from_stack_side_then_peer() -> None:
    k, conn = connect()
    stack = k.stack
    stack.tcp_send(conn, b"bye")
    stack.tcp_close(conn)
    [seg] = k.flush()
    assert seg.payload == b"bye" and seg.flags & FIN  # FIN rides on the last data
    k.take([seg])
    k.ack()
    assert stack.tcp_state(conn) == "FIN-WAIT-2"
    k.send(b"", flags=FIN | ACK)
    assert drain(stack) == [TcpPeerClosed(conn), TcpConnectionClosed(conn)]
    [ack] = k.flush()
    assert ack.ack == k.snd_nxt
    assert stack.tcp_state(conn) == "TIME-WAIT"
    deadline = stack.get_timer()
    assert deadline is not None and deadline <= k.now + 2.0  # bounded TIME-WAIT
    stack.handle_timer(deadline)
    assert stack.tcp_state(conn) is None
    assert stack.stats.tcp_connections_active == 0


def test_close_from_peer_side_then_stack() -> None:
    k, conn = connect()
    stack = k.stack
    k.send(b"request", flags=FIN | ACK | PSH)
    assert drain(stack) == [TcpDataReceived(conn, b"request"), TcpPeerClosed(conn)]
    [ack] = k.flush()
    assert ack.ack == k.snd_nxt
    stack.tcp_send(conn, b"response")
    stack.tcp_close(conn)
    segs = k.flush()
    k.take(segs)
    assert stack.tcp_state(conn) == "LAST-ACK"
    k.ack()
    assert drain(stack) == [TcpConnectionClosed(conn)]
    assert stack.tcp_state(conn) is None
    assert bytes(k.received) == b"response"
    assert stack.stats.buffered_bytes == 0  # the connection's buffers went with it
    stack.tcp_consumed(conn, 7)  # harmless after close


def test_simultaneous_close() -> None:
    k, conn = connect()
    stack = k.stack
    stack.tcp_close(conn)
    [fin] = k.flush()
    assert fin.flags & FIN
    k.send(b"", flags=FIN | ACK)  # crosses our FIN: does not acknowledge it yet
    assert stack.tcp_state(conn) == "CLOSING"
    k.take([fin])
    k.ack()
    assert stack.tcp_state(conn) == "TIME-WAIT"
    assert drain(stack) == [TcpPeerClosed(conn), TcpConnectionClosed(conn)]


def test_rst_from_peer_resets() -> None:
    k, conn = connect()
    stack = k.stack
    k.feed(k.packet(RST | ACK, seq=k.snd_nxt + 5))  # not exactly rcv_nxt: challenge ACK
    [challenge] = k.flush()
    assert challenge.flags == ACK and stack.tcp_state(conn) == "ESTABLISHED"
    k.feed(k.packet(RST | ACK))
    assert drain(stack) == [TcpConnectionReset(conn, "reset by peer")]
    assert stack.tcp_state(conn) is None
    with pytest.raises(LocalProtocolError):
        stack.tcp_send(conn, b"x")


def test_abort_sends_rst() -> None:
    k, conn = connect()
    stack = k.stack
    stack.tcp_send(conn, b"abc")
    stack.tcp_abort(conn)
    pkts = stack.packets_to_send(0.0)
    rst = read_tcp(pkts[-1])
    assert rst.flags & RST
    assert stack.tcp_state(conn) is None
    assert drain(stack) == []
    assert stack.stats.buffered_bytes == 0


def test_retransmission_limit_resets() -> None:
    k, conn = connect(NetStack(NetStackConfig(tcp_max_retransmissions=3)))
    stack = k.stack
    stack.tcp_send(conn, b"lost forever")
    k.flush()
    for _ in range(10):
        deadline = stack.get_timer()
        if deadline is None:
            break
        stack.handle_timer(deadline)
        stack.packets_to_send(deadline)
    assert drain(stack) == [TcpConnectionReset(conn, "retransmission timeout")]
    assert stack.stats.tcp_timeouts == 3


def test_syn_ack_is_retransmitted_and_duplicate_syn_reanswered() -> None:
    stack = NetStack()
    k = Kernel(stack)
    k.syn()
    req = requested(stack)
    k.feed(k.packet(SYN, seq=k.iss))  # kernel retransmits its SYN while we decide
    assert drain(stack) == []
    stack.tcp_accept(req.conn_id)
    [synack] = k.flush()
    deadline = stack.get_timer()
    assert deadline is not None
    stack.handle_timer(deadline)
    [again] = stack.packets_to_send(deadline)
    assert read_tcp(again).seq == synack.seq
    k.handshake_ack(synack)
    assert drain(stack) == [TcpConnectionEstablished(req.conn_id)]


def test_accept_timeout_refuses() -> None:
    stack = NetStack(NetStackConfig(tcp_accept_timeout=5.0))
    k = Kernel(stack)
    k.syn()
    req = requested(stack)
    assert stack.get_timer() == 5.0
    stack.handle_timer(5.0)
    assert drain(stack) == [TcpConnectionReset(req.conn_id, "accept timeout")]
    [rst] = k.flush()
    assert rst.flags & RST


def test_connection_limit_answers_rst() -> None:
    stack = NetStack(NetStackConfig(tcp_max_connections=1))
    Kernel(stack, sport=1).syn()
    k2 = Kernel(stack, sport=2)
    k2.syn()
    assert len(drain(stack)) == 1
    assert stack.stats.tcp_connection_limit_drop == 1
    [rst] = k2.flush()
    assert rst.flags & RST


def test_new_syn_replaces_time_wait() -> None:
    k, conn = connect()
    stack = k.stack
    stack.tcp_close(conn)
    k.take(k.flush())
    k.send(b"", flags=FIN | ACK)
    assert stack.tcp_state(conn) == "TIME-WAIT"
    drain(stack)
    k.flush()
    k.iss += 100_000
    k.snd_nxt = k.iss
    k.syn()
    req = requested(stack)
    assert isinstance(req, TcpConnectionRequested) and req.conn_id != conn


def test_ipv6_with_extension_header() -> None:
    k, conn = connect(src="fd00::2", dst="2001:db8::80", ext_header=True, mss=65000)
    stack = k.stack
    synack = k.segments[0]
    assert synack.src == "2001:db8::80"
    assert int.from_bytes(dict(synack.options)[2], "big") == 65520 - 60
    k.send(b"v6 data")
    assert received(drain(stack)) == b"v6 data"
    stack.tcp_send(conn, bytes(100_000))
    segs = k.flush()
    assert max(len(s.payload) for s in segs) == 65000
    k.take(segs)
    k.ack()
    k.take(k.flush())
    assert len(k.received) == 100_000


def test_large_mss_segments() -> None:
    k, conn = connect(mss=65480, wscale=9)
    stack = k.stack
    k.window = 0xFFFF
    data = bytes(range(256)) * 4096  # 1 MiB
    stack.tcp_send(conn, data)
    while len(k.received) < len(data):
        segs = k.flush()
        assert segs, "stalled"
        assert all(len(s.payload) <= 65480 for s in segs)
        k.take(segs)
        k.ack()
    assert bytes(k.received) == data


def test_corrupted_segment_is_dropped_and_counted() -> None:
    k, _conn = connect()
    stack = k.stack
    k.feed(k.packet(ACK | PSH, b"evil", corrupt=True))
    assert drain(stack) == []
    assert stack.stats.tcp_checksum_drop == 1
    pkt = bytearray(k.packet(ACK | PSH, b"evil"))
    pkt[8] ^= 0xFF  # IPv4 header checksum no longer matches
    k.feed(bytes(pkt))
    assert stack.stats.ip_checksum_drop == 1
    k.feed(k.packet(ACK | PSH, b"good")[:30])
    assert stack.stats.ip_truncated_drop == 1
    assert drain(stack) == []


def test_checksum_offload_leaves_pseudo_header_sum() -> None:
    stack = NetStack(NetStackConfig(checksum_offload=True))
    k = Kernel(stack)
    k.syn()
    req = requested(stack)
    stack.tcp_accept(req.conn_id)
    [pkt] = stack.packets_to_send(0.0)
    field = int.from_bytes(pkt[36:38], "big")
    assert field == 0xFFFF - _cksum(pseudo("93.184.216.34", "10.0.0.2", 6, len(pkt) - 20))


def test_unacceptable_ack_is_dropped() -> None:
    k, _conn = connect()
    stack = k.stack
    k.feed(tcp_packet(k.src, k.dst, k.sport, k.dport, k.snd_nxt, k.rcv_nxt + 5000, ACK, 65535))
    assert stack.stats.tcp_bad_ack_drop == 1
    [ack] = k.flush()
    assert ack.ack == k.snd_nxt


def test_timer_follows_acks_without_a_flush() -> None:
    k, conn = connect(mss=1000)
    stack = k.stack
    stack.tcp_send(conn, bytes(2000))
    segs = k.flush()
    assert stack.get_timer() == 0.2  # the handshake's RTT sample (0 s) gave the minimum RTO
    k.now = 0.1
    k.take(segs[:1])
    k.ack()  # no packets_to_send before asking for the timer
    deadline = stack.get_timer()
    assert deadline is not None and deadline > 0.2  # restarted from the ACK (RFC 6298 §5.3)
    stack.handle_timer(0.2)
    assert stack.packets_to_send(0.2) == []  # the old deadline fired nothing


def test_fin_wait_2_is_bounded() -> None:
    k, conn = connect(NetStack(NetStackConfig(tcp_fin_wait_timeout=10.0)))
    stack = k.stack
    stack.tcp_close(conn)
    k.take(k.flush())
    k.ack()
    assert stack.tcp_state(conn) == "FIN-WAIT-2"
    k.now = 5.0
    k.send(b"still talking")
    assert stack.get_timer() == 15.0
    stack.handle_timer(15.0)
    events = drain(stack)
    assert events[-1] == TcpConnectionReset(conn, "FIN-WAIT-2 timeout")
    assert read_tcp(stack.packets_to_send(15.0)[-1]).flags & RST


def test_small_window_with_nothing_in_flight_still_sends() -> None:
    k, conn = connect(mss=1000, wscale=None)
    stack = k.stack
    stack.tcp_send(conn, bytes(600))
    k.take(k.flush())
    k.ack(window=300)  # everything acknowledged, but the window became small
    stack.tcp_send(conn, bytes(2000))
    segs = k.flush()
    assert [len(s.payload) for s in segs] == [300]  # no deadlock waiting for a bigger window


def test_pending_limit() -> None:
    stack = NetStack(NetStackConfig(tcp_max_pending=1))
    Kernel(stack, sport=1).syn()
    Kernel(stack, sport=2).syn()
    [req] = drain(stack)
    assert isinstance(req, TcpConnectionRequested)
    assert stack.stats.tcp_connection_limit_drop == 1
    stack.tcp_accept(req.conn_id)
    Kernel(stack, sport=3).syn()  # accepting freed the pending slot
    assert len(drain(stack)) == 1
