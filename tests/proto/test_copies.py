"""The paths that copy each payload once: the same bytes on the wire and out of the core.

The send path builds a Data frame as ``encode_data_frame_header + the bytes`` around a view of
the caller's bytes, and the receive path slices the stream bytes straight out of the decrypted
frame. Each test here compares them with the functions they replaced, copied below as they were
(``_old_*``), or checks what such a change risks: a view of a buffer someone else may change,
padding read as data, a payload that changes after it was delivered.
"""

from __future__ import annotations

import hmac
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_proto import (
    Abandoned,
    ClientConnection,
    ConnectionConfig,
    Data,
    PaddingPolicy,
    RelayMessageReceived,
    RemoteProtocolError,
    ServerAcceptor,
    ServerConnection,
    WindowUpdate,
)
from ostp_proto.connection import SERVER_DEFAULTS
from ostp_proto.frames import (
    DATA_FRAME_HEADER_LEN,
    DATAGRAM_OVERHEAD,
    FRAME_HEADER_LEN,
    FrameKind,
    decode_frame,
    decode_frame_header,
    encode_data_frame_header,
    encode_frame,
)
from ostp_proto.obfuscation import NONCE_PREFIX
from ostp_proto.relay import decode_relay

KEY = "copies-key-0123456789abcdef"
UNIX = 1_700_000_000.0
MAX_CHUNK = 65507 - DATAGRAM_OVERHEAD - 3  # the largest Data a datagram carries

# ------------------------------------------------ the functions as they were (43ebee5)

_OLD_HEADER = struct.Struct(">BBHHIH")
_OLD_KINDS = frozenset(range(1, 8))


def _old_encode_frame(
    kind: int, stream_id: int, payload: bytes, pad_len: int = 0, reserved: int = 0
) -> bytes:
    header = _OLD_HEADER.pack(1, kind, reserved, stream_id, len(payload), pad_len)
    if pad_len:
        return b"".join((header, payload, bytes(pad_len)))
    return header + payload


def _old_encode_data_header(length: int) -> bytes:
    return b"\x02" + struct.pack(">H", length)


def _old_decode_frame(plaintext: bytes) -> tuple[int, int, bytes]:
    if len(plaintext) < 12:
        raise RemoteProtocolError("frame shorter than its header")
    _version, kind, _reserved, stream_id, payload_len, pad_len = _OLD_HEADER.unpack_from(plaintext)
    if kind not in _OLD_KINDS:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    end = 12 + payload_len
    if end + pad_len > len(plaintext):
        raise RemoteProtocolError("frame lengths exceed the datagram")
    return kind, stream_id, plaintext[12:end]


def _old_seal(
    encrypt: object, obfuscation_key: bytes, session_id: int, nonce: int, frame: bytes
) -> bytes:
    """DataSealer.seal as upstream defines it: the bare AEAD and hmac.digest for the mask."""
    assert callable(encrypt)
    ct: bytes = encrypt(NONCE_PREFIX + nonce.to_bytes(8, "big"), frame, session_id.to_bytes(4))
    sample = ct[:32].ljust(32, b"\0")
    mask = hmac.digest(obfuscation_key, sample, "sha256")
    header = ((session_id << 64) | nonce) ^ int.from_bytes(mask[:12], "big")
    return header.to_bytes(12, "big") + ct


# ------------------------------------------------------------------------------- frames


@given(
    stream_id=st.integers(0, 0xFFFF),
    length=st.one_of(st.integers(0, 2000), st.integers(0, MAX_CHUNK)),
    pad=st.one_of(st.just(0), st.integers(0, 1300)),
    reserved=st.integers(0, 0xFFFF),
)
def test_a_data_frame_built_around_the_bytes_is_the_old_frame(
    stream_id: int, length: int, pad: int, reserved: int
) -> None:
    data = random.Random(length).randbytes(length)
    head = encode_data_frame_header(stream_id, length, pad, reserved)
    assert len(head) == DATA_FRAME_HEADER_LEN
    new = head + data + bytes(pad)
    old = _old_encode_frame(
        FrameKind.DATA, stream_id, _old_encode_data_header(length) + data, pad, reserved
    )
    assert new == old


@given(
    kind=st.integers(0, 255),
    stream_id=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
    pad=st.integers(0, 300),
    reserved=st.integers(0, 0xFFFF),
)
def test_every_frame_kind_encodes_as_before(
    kind: int, stream_id: int, payload: bytes, pad: int, reserved: int
) -> None:
    assert encode_frame(kind, stream_id, payload, pad, reserved) == _old_encode_frame(
        kind, stream_id, payload, pad, reserved
    )


def _frame_like(draw: st.DrawFn) -> bytes:
    """Mostly well-formed frame headers with lengths around the real ones, some garbage."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    kind = draw(st.integers(0, 9))
    payload = draw(st.binary(max_size=60))
    pad = draw(st.binary(max_size=30))
    declared = max(len(payload) + draw(st.integers(-3, 3)), 0)
    declared_pad = max(len(pad) + draw(st.integers(-3, 3)), 0)
    header = _OLD_HEADER.pack(
        draw(st.integers(0, 255)),
        kind,
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFF)),
        declared,
        declared_pad,
    )
    return header + payload + pad + draw(st.binary(max_size=4))


frames_like = st.composite(_frame_like)()


@given(frames_like)
def test_decoding_a_frame_gives_the_old_result_or_error(plaintext: bytes) -> None:
    try:
        expected: tuple[int, int, bytes] | str = _old_decode_frame(plaintext)
    except RemoteProtocolError as exc:
        expected = str(exc)
    for decode in (decode_frame, _via_header):
        try:
            got: tuple[int, int, bytes] | str = decode(plaintext)
        except RemoteProtocolError as exc:
            got = str(exc)
        assert got == expected


def _via_header(plaintext: bytes) -> tuple[int, int, bytes]:
    kind, stream_id, end = decode_frame_header(plaintext)
    return kind, stream_id, plaintext[FRAME_HEADER_LEN:end]


# ------------------------------------------------------------------ connections


def _pair(
    client_config: ConnectionConfig, server_config: ConnectionConfig, seed: int = 1
) -> tuple[ClientConnection, ServerConnection]:
    rnd = random.Random(seed).randbytes
    client = ClientConnection(access_key=KEY, config=client_config, random_bytes=rnd)
    acceptor = ServerAcceptor([KEY], config=server_config, random_bytes=rnd)
    client.connect(0.0, UNIX)
    [first] = client.datagrams_to_send(0.0)
    server = acceptor.accept(first, 0.0, UNIX)
    assert server is not None
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.0)
    for conn in (client, server):
        while conn.next_event() is not None:
            pass
    for conn in (client, server):
        conn.sender.cc.cwnd = 1 << 40  # no ACKs come back in these tests
    return client, server


def _flush(conn: ClientConnection) -> list[bytes]:
    """Everything queued, as datagrams (the clock moves on for pacing)."""
    out: list[bytes] = []
    now = 1.0
    while conn.send_buffer_bytes:
        out += conn.datagrams_to_send(now)
        now += 0.05
        assert now < 1000, "the queue does not drain"
    return out


POLICIES = {
    "none": PaddingPolicy.none(),
    "client": PaddingPolicy.upstream_client(1350),
    "server": PaddingPolicy.upstream_server(),
    "fixed": PaddingPolicy(fixed=700, profile=None),
}


def _config(size: int, policy: str, *, extensions: bool = False) -> ConnectionConfig:
    return ConnectionConfig(
        max_datagram_size=size,
        padding=POLICIES[policy],
        keepalive_interval=None,
        extensions=extensions,
        stream_send_limit=1 << 30,
        send_buffer_limit=1 << 30,
    )


def _opened(server: ServerConnection, datagram: bytes) -> tuple[int, bytes]:
    opener = server._opener
    assert opener is not None
    nonce = opener.unmask(datagram)
    assert nonce is not None
    plaintext = opener.decrypt(nonce, datagram)
    assert plaintext is not None
    return nonce, plaintext


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([576, 1302, 1400, 9000, 65507]),
    policy=st.sampled_from(sorted(POLICIES)),
    stream_id=st.integers(1, 0xFFFF),
    lengths=st.lists(st.integers(0, 150_000), min_size=1, max_size=3),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    shrink_to=st.sampled_from([None, 576, 1000]),
)
def test_stream_bytes_leave_as_the_old_frames_sealed(
    size: int, policy: str, stream_id: int, lengths: list[int], kind: str, shrink_to: int | None
) -> None:
    """What send_data makes of stream bytes is, datagram for datagram, the old frames (the
    relay message, then the frame around it) sealed as upstream seals them; only the random
    parts (the reserved field, adaptive padding) are taken from what was sent. With
    ``shrink_to`` the path shrinks after the bytes were queued, so queued Data is cut again
    when it is sent."""
    config = _config(size, policy)
    client, server = _pair(config, SERVER_DEFAULTS)
    rng = random.Random(size + sum(lengths))
    chunks = [rng.randbytes(n) for n in lengths]
    for chunk in chunks:
        if kind == "bytes":
            client.send_data(stream_id, chunk)
        elif kind == "bytearray":
            client.send_data(stream_id, bytearray(chunk))
        else:
            client.send_data(stream_id, memoryview(bytearray(chunk)))
    step = client.max_stream_chunk
    pieces = [c[i : i + step] for c in chunks for i in range(0, max(len(c), 1), step)]
    if shrink_to is not None and shrink_to < size:
        client.set_path_mtu(1.0, shrink_to)
        step = client.max_stream_chunk
        pieces = [p[i : i + step] for p in pieces for i in range(0, max(len(p), 1), step)]
    datagrams = _flush(client)
    sealer = client._sealer
    assert sealer is not None
    encrypt = sealer._encrypt
    obfuscation_key = client._secrets.obfuscation_key
    assert len(datagrams) == len(pieces)
    padding = client._padding
    for datagram, piece in zip(datagrams, pieces, strict=True):
        nonce, plaintext = _opened(server, datagram)
        _v, _k, reserved, _s, _len, pad = _OLD_HEADER.unpack_from(plaintext)
        relay = _old_encode_data_header(len(piece)) + piece
        if not padding.adaptive:  # adaptive padding is random: taken from the frame
            assert pad == padding.pad_len(len(relay))
        frame = _old_encode_frame(FrameKind.DATA, stream_id, relay, pad, reserved)
        assert datagram == _old_seal(encrypt, obfuscation_key, client.session_id, nonce, frame)


def test_queued_bytes_are_a_view_of_the_callers_bytes_and_nothing_else_is_kept() -> None:
    """bytes are immutable, so the queue may hold a view of them (no copy); a bytearray or a
    view of one is copied, so the caller may change it or resize it at once."""
    client, _server = _pair(_config(1400, "none"), SERVER_DEFAULTS)
    data = random.Random(1).randbytes(5000)
    client.send_data(1, data)
    queued = client._queues[1]
    assert all(isinstance(v, memoryview) and v.obj is data for v in queued)
    buffer = bytearray(b"x" * 3000)
    client.send_data(2, buffer)
    client.send_data(3, memoryview(buffer)[:100])
    assert all(isinstance(v, memoryview) and v.obj is not buffer for v in client._queues[2])
    buffer.extend(b"y" * 10)  # no export of the buffer is held: it can still be resized
    del buffer[:50]


@pytest.mark.parametrize("kind", ["bytearray", "memoryview"])
def test_a_buffer_changed_after_send_data_does_not_change_what_is_sent(kind: str) -> None:
    client, server = _pair(_config(1400, "none"), SERVER_DEFAULTS)
    original = random.Random(2).randbytes(4000)
    buffer = bytearray(original)
    client.send_data(5, buffer if kind == "bytearray" else memoryview(buffer))
    buffer[:] = bytes(len(buffer))  # the caller reuses its buffer before the flush
    got = b""
    for d in _flush(client):
        server.receive_datagram(d, 1.0)
    while (event := server.next_event()) is not None:
        if isinstance(event, RelayMessageReceived) and isinstance(event.message, Data):
            got += event.message.data
    assert got == original


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([600, 1400, 20000]),
    policy=st.sampled_from(sorted(POLICIES)),
)
def test_delivered_data_stays_intact_whatever_arrives_after_it(
    seed: int, size: int, policy: str
) -> None:
    """Data payloads handed out are never views of a buffer the core reuses: every payload
    kept from the first event on still holds its bytes after the rest of the datagrams came
    in (shuffled, some twice, so frames wait in the reorder buffer)."""
    rng = random.Random(seed)
    client, server = _pair(_config(size, policy), _config(size, policy), seed)
    streams = {sid: rng.randbytes(rng.randrange(0, 6 * size)) for sid in (1, 2, 7)}
    for sid, data in streams.items():
        client.send_data(sid, data)
    datagrams = _flush(client)
    arrivals = datagrams + rng.sample(datagrams, len(datagrams) // 3)
    rng.shuffle(arrivals)
    kept: list[tuple[int, bytes, bytes]] = []  # (stream, payload, its bytes when delivered)
    for d in arrivals:
        server.receive_datagram(d, 1.0)
        while (event := server.next_event()) is not None:
            if isinstance(event, RelayMessageReceived) and isinstance(event.message, Data):
                payload = event.message.data
                assert type(payload) is bytes
                kept.append((event.stream_id, payload, bytes(bytearray(payload))))
    for _sid, payload, snapshot in kept:
        assert payload == snapshot
    for sid, data in streams.items():
        assert b"".join(p for s, p, _ in kept if s == sid) == data


@st.composite
def relay_payloads(draw: st.DrawFn) -> bytes:
    """Relay payloads: whole Data messages, Data with wrong lengths, other tags, garbage."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        body = draw(st.binary(max_size=200))
        return _old_encode_data_header(len(body)) + body + draw(st.binary(max_size=5))
    if choice == 1:
        body = draw(st.binary(max_size=50))
        declared = max(len(body) + draw(st.integers(-3, 3)), 0)
        return b"\x02" + declared.to_bytes(2, "big") + body
    if choice == 2:
        return bytes((draw(st.sampled_from([4, 5, 6, 9, 0x0B, 0x7F])),)) + draw(
            st.binary(max_size=20)
        )
    return draw(st.binary(max_size=40))


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from([FrameKind.DATA, FrameKind.RESUME, 0, 8, 99]),
            st.integers(1, 5),
            relay_payloads(),
            st.binary(max_size=40),  # padding, random as upstream sends it
            st.integers(-2, 2),  # the declared payload length, off by this much
        ),
        min_size=1,
        max_size=12,
    )
)
def test_received_frames_deliver_what_the_old_decoders_did(
    frames: list[tuple[int, int, bytes, bytes, int]],
) -> None:
    """Authenticated frames of any shape: the server counts the same drops and delivers the
    same Data as decoding each with the old decode_frame and then decode_relay would."""
    client, server = _pair(_config(1400, "none"), _config(1400, "none"))
    sealer = client._sealer
    assert sealer is not None
    expected: list[RelayMessageReceived] = []
    frame_drops = relay_drops = 0
    for nonce, (kind, sid, payload, pad, off) in enumerate(frames, client.sender.next_nonce):
        declared = max(len(payload) + off, 0)
        plaintext = _OLD_HEADER.pack(1, kind, 0, sid, declared, len(pad)) + payload + pad
        try:
            _k, stream, old_payload = _old_decode_frame(plaintext)
        except RemoteProtocolError:
            frame_drops += 1
        else:
            try:
                message = decode_relay(old_payload)
            except RemoteProtocolError:
                relay_drops += 1
            else:
                if isinstance(message, Data):
                    expected.append(RelayMessageReceived(stream, message))
                elif isinstance(message, (WindowUpdate, Abandoned)):
                    relay_drops += 1  # extension messages, and the extension is off

        server.receive_datagram(sealer.seal(nonce, plaintext), 1.0)
    got = [
        e
        for e in iter(server.next_event, None)
        if isinstance(e, RelayMessageReceived) and isinstance(e.message, Data)
    ]
    assert got == expected
    assert all(type(e.message.data) is bytes for e in got if isinstance(e.message, Data))
    assert server.stats.frame_decode_drop == frame_drops
    assert server.stats.relay_decode_drop == relay_drops
