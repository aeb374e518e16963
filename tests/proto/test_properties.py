"""Hypothesis properties of every codec of ostp_proto and of its reliability layer."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto import (
    Close,
    Connect,
    ConnectionConfig,
    ConnectOk,
    Data,
    Error,
    KeepAlive,
    PaddingPolicy,
    Ping,
    Pong,
    Profile,
    RelayMessage,
    RelayMessageReceived,
    RemoteProtocolError,
    UdpAssociate,
    UdpData,
    decode_relay,
    derive_secrets,
    encode_relay,
)
from ostp_proto.arq import (
    MAX_ACK_RANGES,
    Receiver,
    ack_ranges,
    decode_ack,
    decode_nack,
    encode_ack,
    encode_nack,
)
from ostp_proto.frames import FRAME_HEADER_LEN, FrameKind, decode_frame, encode_frame
from ostp_proto.obfuscation import (
    DataOpener,
    DataSealer,
    build_handshake_datagram,
    parse_handshake_datagram,
    unmask_data_header,
)
from ostp_proto.relay import RelayTag

from .harness import Faults, Pair

FAST = settings(max_examples=300, deadline=None)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 2**64 - 1)
OBF_KEY = derive_secrets("property key").obfuscation_key

# ------------------------------------------------------------------------- relay messages (§8)

relay_messages: st.SearchStrategy[RelayMessage] = st.one_of(
    st.builds(Connect, st.text(max_size=300)),
    st.builds(Data, st.binary(max_size=2000)),
    st.just(KeepAlive()),
    st.just(Close()),
    st.just(ConnectOk()),
    st.builds(Error, st.text(max_size=300)),
    st.builds(Ping, U64),
    st.builds(Pong, U64),
    st.just(UdpAssociate()),
    st.builds(UdpData, st.text(max_size=100), st.binary(max_size=2000)),
)


@FAST
@given(relay_messages, st.binary(max_size=20))
def test_relay_round_trip_for_all_ten_kinds(message: RelayMessage, trailing: bytes) -> None:
    encoded = encode_relay(message)
    assert decode_relay(encoded) == message
    # spec §8: extra bytes after the declared lengths are ignored
    assert decode_relay(encoded + trailing) == message


def test_relay_strategy_covers_all_ten_tags() -> None:
    seen: set[int] = set()

    @settings(max_examples=400, deadline=None, database=None)
    @given(relay_messages)
    def collect(message: RelayMessage) -> None:
        seen.add(encode_relay(message)[0])

    collect()
    assert seen == set(range(1, 11))


@FAST
@given(st.binary(max_size=300))
def test_relay_decode_of_arbitrary_bytes(data: bytes) -> None:
    try:
        message = decode_relay(data)
    except RemoteProtocolError:
        return
    # whatever decodes is canonical: re-encoding gives back a prefix of the input
    assert data.startswith(encode_relay(message))


@settings(max_examples=20, deadline=None)
@given(st.integers(65_536, 70_000), st.sampled_from([Data, Connect, Error]))
def test_relay_long_fields_are_truncated_to_65535(length: int, kind: type) -> None:
    if kind is Data:
        message = decode_relay(encode_relay(Data(b"x" * length)))
        assert message == Data(b"x" * 0xFFFF)
    else:
        message = decode_relay(encode_relay(kind("y" * length)))
        assert message == kind("y" * 0xFFFF)


# ---------------------------------------------------------------------------------- frames (§6)

frame_kinds = st.sampled_from([int(k) for k in FrameKind])


@FAST
@given(frame_kinds, U16, st.binary(max_size=1500), st.integers(0, 300), U16, st.binary(max_size=8))
def test_frame_round_trip(
    kind: int, stream_id: int, payload: bytes, pad: int, reserved: int, trailing: bytes
) -> None:
    plaintext = encode_frame(kind, stream_id, payload, pad, reserved)
    assert len(plaintext) == 12 + len(payload) + pad
    assert decode_frame(plaintext) == (kind, stream_id, payload)
    assert decode_frame(plaintext + trailing) == (kind, stream_id, payload)


@FAST
@given(st.binary(max_size=200))
def test_frame_decode_of_arbitrary_bytes(data: bytes) -> None:
    try:
        kind, _stream_id, payload = decode_frame(data)
    except RemoteProtocolError:
        return
    assert kind in set(FrameKind)
    assert int.from_bytes(data[6:10], "big") == len(payload)
    assert 12 + len(payload) + int.from_bytes(data[10:12], "big") <= len(data)


@FAST
@given(st.integers(0, 255), frame_kinds, U16, st.binary(max_size=50))
def test_frame_version_is_not_checked(
    version: int, kind: int, stream_id: int, payload: bytes
) -> None:
    plaintext = bytes((version,)) + encode_frame(kind, stream_id, payload)[1:]
    assert decode_frame(plaintext) == (kind, stream_id, payload)


# ------------------------------------------------------------------------ ACK / NACK (§7.3)


@FAST
@given(st.lists(st.tuples(U64, U64), max_size=255))
def test_ack_payload_round_trip(ranges: list[tuple[int, int]]) -> None:
    assert decode_ack(encode_ack(ranges)) == ranges


@FAST
@given(st.binary(max_size=300))
def test_ack_and_nack_decode_of_arbitrary_bytes(data: bytes) -> None:
    try:
        ranges = decode_ack(data)
    except RemoteProtocolError:
        assert not data or len(data) < 1 + 16 * data[0]
    else:
        assert len(ranges) == data[0]
    try:
        nonce = decode_nack(data)
    except RemoteProtocolError:
        assert len(data) < 8
    else:
        assert encode_nack(nonce) == data[:8]


def _runs(nonces: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for n in nonces:
        if runs and runs[-1][1] + 1 == n:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


@FAST
@given(st.integers(0, 2**40), st.sets(st.integers(1, 400), max_size=120))
def test_ack_ranges_cumulative_first_then_last_seven_runs(expected: int, offsets: set[int]) -> None:
    buffered = sorted(expected + o for o in offsets)  # the buffer only holds nonces > expected
    ranges = ack_ranges(expected, buffered)
    assert len(ranges) <= MAX_ACK_RANGES
    runs = _runs(buffered)
    if expected > 0:
        assert ranges[0] == (0, expected - 1)
        kept = ranges[1:]
        assert kept == runs[-(MAX_ACK_RANGES - 1) :] if runs else kept == []
    else:
        assert ranges == runs[-MAX_ACK_RANGES:]
    # never acknowledges a nonce that was not received
    got = set(buffered)
    for start, end in ranges:
        if start > 0 or expected == 0:
            assert set(range(start, end + 1)) <= got
    assert decode_ack(encode_ack(ranges)) == ranges


def test_ack_ranges_spec_example() -> None:
    # spec §13 V8
    assert ack_ranges(5, [7, 8, 10]) == [(0, 4), (7, 8), (10, 10)]
    assert ack_ranges(0, []) == []


# -------------------------------------------------------------- datagrams and masking (§4, §5)


@FAST
@given(st.binary(max_size=400))
def test_handshake_datagram_parse_of_arbitrary_bytes(data: bytes) -> None:
    try:
        sid, message = parse_handshake_datagram(OBF_KEY, data)
    except RemoteProtocolError:
        return
    assert 0 <= sid <= 0xFFFFFFFF
    assert 1 <= len(message) <= len(data) - 6
    assert data[6 : 6 + len(message)] == message


@FAST
@given(U32, st.binary(min_size=32, max_size=1100), st.binary(max_size=300))
def test_handshake_datagram_round_trip(sid: int, message: bytes, padding: bytes) -> None:
    # Noise messages are >= 48 bytes, so the mask sample is always inside the message (§4)
    datagram = build_handshake_datagram(OBF_KEY, sid, message, padding)
    assert len(datagram) == 6 + len(message) + len(padding)
    assert parse_handshake_datagram(OBF_KEY, datagram) == (sid, message)


@FAST
@given(U32, U64, st.binary(min_size=12, max_size=1300))
def test_data_datagram_round_trip(sid: int, nonce: int, frame: bytes) -> None:
    key = hashlib.sha256(frame).digest()
    datagram = DataSealer(OBF_KEY, key, sid).seal(nonce, frame)
    assert len(datagram) == 12 + len(frame) + 16
    assert unmask_data_header(OBF_KEY, datagram) == (sid, nonce)
    opener = DataOpener(OBF_KEY, key, sid)
    assert opener.unmask(datagram) == nonce
    assert opener.decrypt(nonce, datagram) == frame
    # another session id does not match; another key does not authenticate
    assert DataOpener(OBF_KEY, key, sid ^ 1).unmask(datagram) is None
    assert DataOpener(OBF_KEY, bytes(32), sid).decrypt(nonce, datagram) is None


@FAST
@given(st.binary(max_size=200), U32, U64)
def test_data_opener_on_arbitrary_bytes(data: bytes, sid: int, nonce: int) -> None:
    opener = DataOpener(OBF_KEY, bytes(32), sid)
    got = opener.unmask(data)
    assert got is None or (len(data) >= 40 and 0 <= got < 2**64)
    assert opener.decrypt(nonce, data) is None
    if len(data) >= 12:
        s, n = unmask_data_header(OBF_KEY, data)
        assert 0 <= s < 2**32 and 0 <= n < 2**64


# --------------------------------------------------------------------------- padding (§6.1)


def _clamp(policy: PaddingPolicy, length: int) -> int:
    return max(policy.mtu_hint - length - 38, 0)


policies = st.one_of(
    st.builds(PaddingPolicy.upstream_client, st.integers(0, 9000)),
    st.just(PaddingPolicy.upstream_server()),
    st.just(PaddingPolicy.none()),
    st.builds(
        PaddingPolicy,
        mtu_hint=st.integers(0, 9000),
        max_pad=st.integers(0, 2000),
        profile=st.sampled_from(list(Profile)),
    ),
    st.builds(
        PaddingPolicy,
        mtu_hint=st.integers(0, 9000),
        max_pad=st.integers(0, 2000),
        profile=st.none(),
        adaptive=st.just(True),
    ),
    st.builds(
        PaddingPolicy,
        mtu_hint=st.integers(0, 9000),
        max_pad=st.integers(0, 2000),
        profile=st.none(),
        fixed=st.integers(0, 3000),
    ),
)


@settings(max_examples=500, deadline=None)
@given(policies, st.integers(0, 70_000), st.randoms(use_true_random=False))
def test_pad_len_within_bounds(policy: PaddingPolicy, length: int, rnd: random.Random) -> None:
    asked: list[int] = []

    def randint(n: int) -> int:
        asked.append(n)
        return rnd.randint(0, n)

    pad = policy.pad_len(length, randint)
    assert 0 <= pad <= _clamp(policy, length)
    if policy.fixed is not None:
        assert pad == min(max(policy.fixed - length, 0), _clamp(policy, length))
    elif policy.profile is not None:
        target = policy.profile.target(length)
        assert pad == min(max(target - length, 0), policy.max_pad, _clamp(policy, length))
        assert target <= 1280
    elif policy.adaptive:
        assert pad <= policy.max_pad
        assert all(0 < n <= 256 for n in asked)
        target = max(min(max(-(-length // 64) * 64, 64), policy.mtu_hint), length)
        base = target - length
        assert pad >= min(base, policy.max_pad, _clamp(policy, length))
    else:
        assert pad == 0
    assert policy.pad_len(length) <= _clamp(policy, length)  # no randint: no jitter


def test_client_ping_padding_matches_the_spec_example() -> None:
    # spec §6.1: client Ping (L = 11, JsonRpc) -> pad 245
    assert PaddingPolicy.upstream_client().pad_len(11) == 245


# ------------------------------------------------------------------------------- secrets (§2)


@FAST
@given(st.binary(max_size=200))
def test_derive_secrets_ranges(key: bytes) -> None:
    s = derive_secrets(key)
    assert len(s.obfuscation_key) == 8 and len(s.psk) == 32
    assert 16 <= s.handshake_pad_min <= 79
    assert s.handshake_pad_min + 48 <= s.handshake_pad_max <= s.handshake_pad_min + 175
    assert "psk" not in repr(s) or s.psk.hex() not in repr(s)


@FAST
@given(st.text(max_size=100))
def test_derive_secrets_uses_the_utf8_bytes(key: str) -> None:
    assert derive_secrets(key) == derive_secrets(key.encode())


# ---------------------------------------------------------------------- reliability (§7.3)


@st.composite
def arrival_orders(draw: st.DrawFn) -> tuple[int, list[int], set[int]]:
    """n nonces, an arrival order (a permutation with duplicates), and which are control."""
    n = draw(st.integers(1, 150))
    order = draw(st.permutations(range(n)))
    dups = draw(st.lists(st.integers(0, n - 1), max_size=n))
    arrivals = list(order)
    for d in dups:
        arrivals.insert(draw(st.integers(0, len(arrivals))), d)
    control = draw(st.sets(st.integers(0, n - 1), max_size=n // 3))
    return n, arrivals, control


@settings(max_examples=300, deadline=None)
@given(arrival_orders())
def test_receiver_delivers_each_frame_once_and_in_order(
    case: tuple[int, list[int], set[int]],
) -> None:
    n, arrivals, control = case
    receiver = Receiver(ack_delay=0.005, ack_frequency=32)
    delivered: list[int] = []
    received: set[int] = set()
    now = 0.0
    for nonce in arrivals:
        now += 0.001
        if receiver.classify(nonce, now):
            assert nonce in received  # only duplicates are refused here
            continue
        assert nonce not in received
        received.add(nonce)
        frame = None if nonce in control else (FrameKind.DATA, 1, nonce.to_bytes(4, "big"), 4)
        out = receiver.accept(nonce, frame, frame is not None, now)
        delivered += [int.from_bytes(p, "big") for _k, _s, p, _e in out]
        # an ACK never claims a nonce that has not arrived
        ack = receiver.build_ack(now)
        if ack is not None:
            for start, end in decode_ack(ack):
                assert start <= end
                assert set(range(start, end + 1)) <= received
    assert delivered == [i for i in range(n) if i not in control]
    assert receiver.expected == n and not receiver.buffer
    assert receiver.stats.duplicate_drop == len(arrivals) - n
    assert receiver.stats.gap_skips == 0


# ------------------------------------------------------------- whole connections under faults

fault_rates = st.builds(
    Faults,
    loss=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    duplicate=st.sampled_from([0.0, 0.05, 0.2]),
    reorder=st.sampled_from([0.0, 0.1, 0.3]),
    corrupt=st.sampled_from([0.0, 0.02, 0.1]),
    drop_first=st.integers(0, 2),
)


@pytest.mark.timeout(120)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    c2s=fault_rates,
    s2c=fault_rates,
    seed=st.integers(0, 2**16),
    up_len=st.integers(0, 150_000),
    down_len=st.integers(0, 150_000),
    latency=st.sampled_from([0.001, 0.01, 0.05]),
    chunk=st.sampled_from([1_000, 7_000, 65_536]),
)
def test_any_fault_schedule_ends_byte_exact(
    c2s: Faults, s2c: Faults, seed: int, up_len: int, down_len: int, latency: float, chunk: int
) -> None:
    config = ConnectionConfig(padding=PaddingPolicy.none(), handshake_attempts=1000)
    pair = Pair(c2s=c2s, s2c=s2c, seed=seed, client_config=config, latency=latency)
    pair.handshake(limit=600.0)
    rng = random.Random(seed)
    up, down = rng.randbytes(up_len), rng.randbytes(down_len)
    pair.transfer(up, down, chunk=chunk)
    assert pair.cpeer.terminated is None and pair.speer.terminated is None
    assert pair.cpeer.lost == pair.speer.lost == 0
    assert bytes(pair.speer.received[1]) == up
    assert bytes(pair.cpeer.received[1]) == down


@st.composite
def stream_sends(draw: st.DrawFn) -> list[tuple[bool, int, bytes]]:
    """(client sends?, stream id, bytes) in the order the owners queue them."""
    return draw(
        st.lists(
            st.tuples(st.booleans(), st.integers(0, 5), st.binary(min_size=0, max_size=3000)),
            max_size=30,
        )
    )


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sends=stream_sends(), c2s=fault_rates, s2c=fault_rates, seed=st.integers(0, 2**16))
def test_interleaved_streams_arrive_in_order_per_stream(
    sends: list[tuple[bool, int, bytes]], c2s: Faults, s2c: Faults, seed: int
) -> None:
    config = ConnectionConfig(padding=PaddingPolicy.none(), handshake_attempts=1000)
    pair = Pair(c2s=c2s, s2c=s2c, seed=seed, client_config=config)
    pair.handshake(limit=600.0)
    server = pair.server
    assert server is not None
    expect_up: dict[int, bytes] = {}
    expect_down: dict[int, bytes] = {}
    for from_client, stream_id, data in sends:
        if from_client:
            pair.client.send(stream_id, Data(data))
            expect_up[stream_id] = expect_up.get(stream_id, b"") + data
        else:
            server.send(stream_id, Data(data))
            expect_down[stream_id] = expect_down.get(stream_id, b"") + data

    def done() -> bool:
        return all(bytes(pair.speer.received[s]) == d for s, d in expect_up.items()) and all(
            bytes(pair.cpeer.received[s]) == d for s, d in expect_down.items()
        )

    pair.run_until(done, pair.now + 300.0)
    assert pair.server is server, "a handshake datagram replaced the session"
    assert pair.cpeer.terminated is None and pair.speer.terminated is None
    assert {s: bytes(b) for s, b in pair.speer.received.items() if b} == {
        s: d for s, d in expect_up.items() if d
    }
    assert {s: bytes(b) for s, b in pair.cpeer.received.items() if b} == {
        s: d for s, d in expect_down.items() if d
    }


@given(key=st.binary(max_size=100), sample=st.binary(min_size=32, max_size=32))
def test_header_mask_from_precomputed_states_is_hmac_sha256(key: bytes, sample: bytes) -> None:
    from ostp_proto.obfuscation import _HeaderMask

    assert _HeaderMask(key)(sample) == hmac.digest(key, sample, "sha256")


@given(
    btl_bw=st.floats(min_value=0, max_value=1e10),
    cwnd=st.integers(min_value=1, max_value=1 << 30),
    srtt=st.floats(min_value=0, max_value=2),
    startup=st.booleans(),
    next_send=st.floats(min_value=0, max_value=100),
    now=st.floats(min_value=0, max_value=100),
    size=st.integers(min_value=1, max_value=65507),
)
def test_record_paces_as_congestion_controller_on_sent(
    btl_bw: float,
    cwnd: int,
    srtt: float,
    startup: bool,
    next_send: float,
    now: float,
    size: int,
) -> None:
    """Sender.record has CongestionController.on_sent inlined: both give the same pacing."""
    from ostp_proto.arq import Sender

    sender = Sender(mss=1200, initial_rtt=0.1, max_in_flight=8192, min_rto=0.2, max_rto=5)
    sender.rtt.srtt = srtt
    cc = sender.cc
    cc.btl_bw, cc.cwnd, cc.startup, cc.next_send = btl_bw, cwnd, startup, next_send
    sender.record(0, bytes(size), now, True)
    sender.cc.next_send, inlined = next_send, cc.next_send
    cc.on_sent(size, now, srtt)
    assert inlined == cc.next_send


_HANDSHAKEN: list[Pair] = []
_DATA = bytes([RelayTag.DATA])


def _established_client() -> Pair:
    if not _HANDSHAKEN:
        pair = Pair()
        pair.handshake()
        _HANDSHAKEN.append(pair)
    return _HANDSHAKEN[0]


@given(
    payload=st.one_of(
        st.binary(max_size=40),
        st.builds(lambda body, extra: _DATA + body + extra, st.binary(max_size=40), st.binary()),
        st.builds(  # declared lengths around the real one: whole, short by a byte, ...
            lambda body, delta: _DATA + max(len(body) + delta, 0).to_bytes(2, "big") + body,
            st.binary(max_size=300),
            st.integers(min_value=-3, max_value=3),
        ),
    ),
    padding=st.binary(max_size=40),
)
def test_delivered_data_decodes_as_decode_relay_does(payload: bytes, padding: bytes) -> None:
    """_deliver decodes Data in place on its hot path, from the whole frame plaintext: the same
    message as decode_relay gives for the frame's payload (never reading into the padding
    behind it, which upstream fills with random bytes), and what decode_relay refuses is
    dropped and counted the same way."""
    client = _established_client().client
    while client.next_event() is not None:
        pass
    try:
        expected: RelayMessage | None = decode_relay(payload)
    except RemoteProtocolError:
        expected = None
    drops = client.stats.relay_decode_drop
    plaintext = encode_frame(FrameKind.DATA, 7, payload, len(padding))[: -len(padding) or None]
    plaintext += padding
    client._deliver([(FrameKind.DATA, 7, plaintext, FRAME_HEADER_LEN + len(payload))], 1.0)
    got = [e for e in iter(client.next_event, None) if isinstance(e, RelayMessageReceived)]
    if expected is None:
        assert client.stats.relay_decode_drop == drops + 1
        assert got == []
    elif isinstance(expected, Data):
        assert got == [RelayMessageReceived(7, expected)]
        message = got[0].message
        assert isinstance(message, Data) and type(message.data) is bytes
