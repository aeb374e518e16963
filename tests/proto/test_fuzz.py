"""Drives fuzz/proto_datagram.py with hypothesis, and mutates real datagrams of a live pair."""

from __future__ import annotations

import random

from fuzz.proto_datagram import established_pair, run
from fuzz.proto_datagram import test_one_input as fuzz_one_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto import (
    ClientConnection,
    Connection,
    ConnectionConfig,
    PaddingPolicy,
    RelayMessageReceived,
    ServerAcceptor,
    derive_secrets,
)
from ostp_proto.arq import encode_ack, encode_nack
from ostp_proto.frames import FrameKind, encode_frame

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = "fuzz-key-0123456789"
UNIX = 1_700_000_000.0


@SETTINGS
@given(st.binary(max_size=2000))
def test_fuzz_entry_point_never_raises(data: bytes) -> None:
    fuzz_one_input(data)


def _record(op: int, body: bytes) -> bytes:
    return bytes((op,)) + len(body).to_bytes(2, "big") + body


# Bodies that get past the first checks: well-formed ACK/NACK/relay payloads with odd values.
interesting_payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=10).map(
        encode_ack
    ),
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=10).map(encode_ack),
    st.integers(0, 2**64 - 1).map(encode_nack),
    st.integers(0, 300).map(encode_nack),
    st.sampled_from([b"\x02\x00\x03abc", b"\x07\x00\x08" + bytes(8), b"\x04", b"\x0b", b""]),
    # the extension: WindowUpdates with any offset, hello trailers whole or mangled
    st.integers(0, 2**64 - 1).map(lambda n: b"\x40\x00\x08" + n.to_bytes(8, "big")),
    st.binary(max_size=20).map(lambda tail: b"\x03OSTPX" + tail),
)
frame_records = st.builds(
    lambda kind, stream, payload, op: _record(op, bytes((kind, stream)) + payload),
    st.integers(0, 8),
    st.integers(0, 255),
    interesting_payloads,
    st.integers(0, 35).map(lambda b: b * 7 + 5),
)
plaintext_records = st.builds(
    lambda kind, stream, payload, pad, op: _record(op, encode_frame(kind, stream, payload, pad)),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    interesting_payloads,
    st.integers(0, 40),
    st.sampled_from([3, 4, 3 + 7 * 4, 4 + 7 * 4, 3 + 7 * 20, 4 + 7 * 30]),
)
raw_records = st.builds(
    _record, st.sampled_from([0, 1, 2, 7, 8, 9]), st.binary(min_size=0, max_size=200)
)
tick_records = st.builds(_record, st.just(6), st.binary(min_size=1, max_size=1))


@SETTINGS
@given(
    st.lists(st.one_of(frame_records, plaintext_records, raw_records, tick_records), max_size=25)
)
def test_fuzz_entry_point_with_structured_records(records: list[bytes]) -> None:
    fuzz_one_input(b"".join(records))


# ------------------------------------------------------- mutated datagrams of a live pair


def _drops(conn: Connection) -> int:
    s, r = conn.stats, conn.receiver.stats
    return (
        s.datagram_session_drop
        + s.datagram_auth_drop
        + s.state_drop
        + r.duplicate_drop
        + r.window_drop
    )


def _fresh_traffic() -> tuple[Connection, Connection, list[bytes], list[bytes]]:
    """A pair and datagrams each side built that the other has not seen yet."""
    client, server, _ = established_pair(busy=False)
    client.send_data(3, random.Random(1).randbytes(4000))
    server.send_data(3, random.Random(2).randbytes(4000))
    return client, server, client.datagrams_to_send(0.01), server.datagrams_to_send(0.01)


@SETTINGS
@given(
    st.booleans(),
    st.data(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=4),
)
def test_bit_flipped_datagrams_are_dropped_and_counted(
    to_server: bool, data: st.DataObject, flips: list[tuple[int, int]]
) -> None:
    client, server, up, down = _fresh_traffic()
    receiver, datagrams = (server, up) if to_server else (client, down)
    original = data.draw(st.sampled_from(datagrams))
    buf = bytearray(original)
    for pos, bit in flips:
        buf[pos % len(buf)] ^= 1 << bit
    mutated = bytes(buf)
    if mutated == original:  # two flips cancelled out
        return
    before_drops, before_received = _drops(receiver), receiver.stats.datagrams_received
    receiver.receive_datagram(mutated, 0.02)
    assert _drops(receiver) == before_drops + 1
    assert receiver.stats.datagrams_received == before_received
    assert receiver.next_event() is None
    # the originals still get through afterwards
    for d in datagrams:
        receiver.receive_datagram(d, 0.03)
    events = []
    while (ev := receiver.next_event()) is not None:
        events.append(ev)
    assert any(isinstance(e, RelayMessageReceived) and e.stream_id == 3 for e in events)


@SETTINGS
@given(st.booleans(), st.data())
def test_truncated_and_extended_datagrams_are_dropped_and_counted(
    to_server: bool, data: st.DataObject
) -> None:
    client, server, up, down = _fresh_traffic()
    receiver, datagrams = (server, up) if to_server else (client, down)
    original = data.draw(st.sampled_from(datagrams))
    cut = data.draw(st.integers(0, len(original) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=20))
    for mutated in (original[:cut], original + extra):
        before = _drops(receiver)
        receiver.receive_datagram(mutated, 0.02)
        assert _drops(receiver) == before + 1
        assert receiver.next_event() is None


def _handshake_datagram(seed: int) -> bytes:
    client = ClientConnection(
        access_key=KEY,
        config=ConnectionConfig(padding=PaddingPolicy.none()),
        random_bytes=random.Random(seed).randbytes,
    )
    client.connect(0.0, UNIX)
    [datagram] = client.datagrams_to_send(0.0)
    return datagram


@SETTINGS
@given(st.integers(0, 1000), st.data())
def test_bit_flipped_handshake_is_refused_unless_only_padding_changed(
    seed: int, data: st.DataObject
) -> None:
    datagram = _handshake_datagram(seed)
    noise_end = 6 + 32 + 12 + len(KEY) + 16
    pos = data.draw(st.integers(0, len(datagram) - 1))
    buf = bytearray(datagram)
    buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    acceptor = ServerAcceptor([KEY, "another key"])
    accepted = acceptor.accept(bytes(buf), 0.0, UNIX)
    if pos < noise_end:
        assert accepted is None
        assert acceptor.stats.no_key_drop == 1
    else:  # spec §4: padding is random and ignored by the receiver
        assert accepted is not None
    # the untouched datagram is then a replay only if the mutated one was accepted
    again = acceptor.accept(datagram, 0.0, UNIX)
    assert (again is None) == (accepted is not None)


@SETTINGS
@given(st.integers(0, 1000), st.integers(0, 500))
def test_truncated_handshake_is_refused(seed: int, cut: int) -> None:
    datagram = _handshake_datagram(seed)
    secrets = derive_secrets(KEY)
    noise_end = 6 + 32 + 12 + len(KEY) + 16
    acceptor = ServerAcceptor([KEY])
    assert acceptor.accept(datagram[: min(cut, noise_end - 1)], 0.0, UNIX) is None
    # cut inside the padding: accepted exactly when the padding left is in the key's range
    pad_left = min(cut, len(datagram) - noise_end)
    accepted = acceptor.accept(datagram[: noise_end + pad_left], 0.0, UNIX)
    in_range = secrets.handshake_pad_min <= pad_left <= secrets.handshake_pad_max
    assert (accepted is not None) == in_range


def test_sealed_records_reach_the_frame_and_relay_layers() -> None:
    # guards the fuzz target itself: records 3/4/5 must get past the AEAD into the cores
    # op >> 4 == 4 puts the nonce at the receiver's next expected one (filling its gap)
    client, server, cevents, sevents = run(
        _record(66, b"not a frame at all")  # 66 % 7 == 3: garbage, sealed, to the client
        + _record(68, bytes((FrameKind.DATA, 9)) + b"\x02\x00\x02hi")  # 5: Data, to the server
        + _record(67, bytes(12))  # 4: frame kind 0, undecodable, sealed, to the server
        + _record(75, bytes((FrameKind.DATA, 2)) + b"\xff")  # 5 and bit 3: bad relay, to client
        + _record(68, bytes((FrameKind.CLOSE, 0)))  # closes the server
        + _record(1, b"after close")
    )
    assert client.stats.frame_decode_drop == 1
    assert client.stats.relay_decode_drop == 1
    assert server.stats.frame_decode_drop == 1
    assert any(
        isinstance(e, RelayMessageReceived) and e.stream_id == 9 and e.message.data == b"hi"  # type: ignore[union-attr]
        for e in sevents
    )
    assert not server.established and server.stats.state_drop == 1
    assert client.established
    assert not any(isinstance(e, RelayMessageReceived) and e.stream_id == 2 for e in cevents)
