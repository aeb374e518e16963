"""Property tests: garbage never raises, and lossy/reordered transfers always complete."""

from __future__ import annotations

import random

from fuzz.netstack_packet import test_one_input as fuzz_one_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_netstack import NetStack, NetStackConfig, TcpDataReceived
from tests.netstack.kernel import ACK, PSH, SYN, Kernel, udp_packet
from tests.netstack.test_tcp import connect, drain

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(max_size=200))
def test_fuzz_entry_point_never_raises(data: bytes) -> None:
    fuzz_one_input(data)


def _valid_packets() -> list[bytes]:
    k = Kernel(NetStack())
    k.snd_nxt = k.iss
    syn = k.packet(SYN, options=b"\x02\x04\x05\xb4\x01\x03\x03\x07")
    k6 = Kernel(NetStack(), src="fd00::2", dst="2001:db8::1", ext_header=True)
    return [
        syn,
        k.packet(ACK | PSH, b"data" * 10),
        k6.packet(SYN, options=b"\x02\x04\x05\xa0"),
        k6.packet(ACK, b"v6"),
        udp_packet("10.0.0.2", "8.8.8.8", 53, 53, b"dns"),
        udp_packet("fd00::2", "2001:db8::1", 53, 53, b"dns6"),
    ]


VALID = _valid_packets()


@SETTINGS
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
)
def test_mutated_packets_are_dropped_or_handled(
    packet: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    buf = bytearray(packet)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    mutated = bytes(buf[: max(0, len(buf) - cut)])
    fuzz_one_input(b"\0" + mutated)
    # Into an established connection as well.
    k, _conn = connect()
    k.stack.receive_packet(mutated, 1.0)
    k.stack.packets_to_send(1.0)
    assert k.stack.stats.buffered_bytes >= 0


def test_every_corruption_of_a_data_segment_is_caught() -> None:
    k, _conn = connect()
    good = k.packet(ACK | PSH, b"0123456789abcdef")
    stack = k.stack
    for pos in range(len(good)):
        for bit in (0x01, 0x80):
            buf = bytearray(good)
            buf[pos] ^= bit
            stack.receive_packet(bytes(buf), 0.0)
    delivered = [e for e in drain(stack) if isinstance(e, TcpDataReceived)]
    # Every byte is covered by the IPv4 header checksum or the TCP checksum (or the lengths).
    assert delivered == []
    assert stack.stats.ip_checksum_drop + stack.stats.tcp_checksum_drop > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 3000), min_size=1, max_size=20))
def test_reordered_duplicated_upload_is_reassembled(seed: int, sizes: list[int]) -> None:
    rng = random.Random(seed)
    k, _conn = connect()
    stack = k.stack
    data = rng.randbytes(sum(sizes))
    base = k.snd_nxt
    pieces = []
    off = 0
    for size in sizes:
        pieces.append((off, data[off : off + size]))
        off += size
    schedule = pieces + rng.sample(pieces, k=len(pieces) // 3)
    rng.shuffle(schedule)
    for off, piece in schedule:
        k.feed(k.packet(ACK, piece, seq=(base + off) & 0xFFFFFFFF))
        if rng.random() < 0.3:
            stack.packets_to_send(0.0)
    got = b"".join(e.data for e in drain(stack) if isinstance(e, TcpDataReceived))
    assert got == data
    assert stack.stats.buffered_bytes == len(data)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.4), st.sampled_from([536, 1460, 9000]))
def test_lossy_download_completes(seed: int, loss: float, mss: int) -> None:
    rng = random.Random(seed)
    k, conn = connect(NetStack(NetStackConfig(tcp_max_retransmissions=50)), mss=mss)
    stack = k.stack
    data = rng.randbytes(50_000)
    stack.tcp_send(conn, data)
    stack.tcp_close(conn)
    for _ in range(2000):
        segs = [s for s in k.flush() if rng.random() >= loss]
        reordered = rng.random() < 0.2
        if reordered:
            segs.reverse()
        k.take(segs)
        if segs:
            k.ack()
            if rng.random() < 0.3:
                k.ack()  # duplicate
        if len(k.received) == len(data) and stack.tcp_state(conn) == "FIN-WAIT-2":
            break
        if not segs:
            deadline = stack.get_timer()
            assert deadline is not None, "stalled without a timer"
            k.now = max(k.now, deadline)
            stack.handle_timer(k.now)
    assert bytes(k.received) == data
    assert stack.tcp_state(conn) == "FIN-WAIT-2"


@SETTINGS
@given(st.one_of(st.binary(max_size=120), st.sampled_from(VALID)), st.integers(0, 120))
def test_every_packet_is_counted_or_handled(packet: bytes, cut: int) -> None:
    stack = NetStack()
    data = packet[: len(packet) - cut] if cut < len(packet) else packet
    stack.receive_packet(data, 0.0)
    drops = sum(stack.stats.drops().values())
    events = drain(stack)
    assert drops + len(events) == 1, (drops, events)  # exactly one outcome per packet
