"""Properties of the TCP transports (spec §10.6): round trips under any segmentation, the
opening in memory for every framing with and without Reality, replay and forgery handling,
the fuzz entry points, and ``reliable_transport`` keeping the ARQ from fighting TCP."""

from __future__ import annotations

import os

import pytest
from fuzz.stream_frames import test_one_input as fuzz_frames
from fuzz.tcp_opening import test_one_input as fuzz_opening
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto import (
    ClientConnection,
    ConnectionConfig,
    RelayMessageReceived,
    RemoteProtocolError,
    ServerAcceptor,
)
from ostp_proto.transport import (
    DatagramStream,
    Framing,
    LenU16Decoder,
    RealityAcceptor,
    RealityClient,
    StreamAccepted,
    StreamAcceptor,
    StreamConnected,
    StreamConnector,
    StreamRefused,
    WsDecoder,
    encode_len_u16_many,
    encode_ws_frame,
    generate_keypair,
    make_token,
)
from ostp_proto.transport import reality as R
from ostp_proto.transport.framing import OP_CONTINUATION, OP_TEXT, ws_header

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIX = 1_700_000_000.0
KEY = b"prop-key"
SNI = "www.example.com"
SHORT_ID = bytes.fromhex("0123456789abcdef")
PRIVATE, PUBLIC = generate_keypair(lambda n: bytes(range(7, 7 + n)))

datagram_lists = st.lists(st.binary(max_size=3000), max_size=12)
cuts = st.lists(st.integers(1, 700), min_size=1, max_size=40)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


@SETTINGS
@given(datagram_lists, cuts)
def test_len_u16_round_trip(datagrams: list[bytes], sizes: list[int]) -> None:
    decoder = LenU16Decoder()
    got = [d for piece in split(encode_len_u16_many(datagrams), sizes) for d in decoder.feed(piece)]
    assert got == datagrams and decoder.buffered == 0


@SETTINGS
@given(datagram_lists, cuts, st.booleans())
def test_datagram_stream_both_roles(datagrams: list[bytes], sizes: list[int], wss: bool) -> None:
    framing = Framing.WSS if wss else Framing.STREAM
    client = DatagramStream(framing, client=True)
    server = DatagramStream(framing, client=False)
    for sender, receiver in ((client, server), (server, client)):
        wire = sender.encode(datagrams)
        got = [d for piece in split(wire, sizes) for d in receiver.receive(piece)]
        assert got == datagrams


@SETTINGS
@given(st.binary(max_size=500), st.integers(1, 5), st.binary(min_size=4, max_size=4), cuts)
def test_fragmented_websocket_message_is_joined(
    payload: bytes, parts: int, mask: bytes, sizes: list[int]
) -> None:
    chunks = [payload[i::parts] for i in range(parts)]
    message = b"".join(chunks)
    wire = b""
    for i, chunk in enumerate(chunks):
        opcode = OP_TEXT if i == 0 else OP_CONTINUATION
        wire += ws_header(len(chunk), opcode=opcode, fin=i == parts - 1) + chunk
    wire += encode_ws_frame(b"ping!", mask=mask, opcode=0x9)  # control frames interleave
    decoder = WsDecoder()
    got = [d for piece in split(wire, sizes) for d in decoder.feed(piece)]
    assert got == [message]
    control = decoder.next_control()
    assert control is not None and control.opcode == 0x9 and control.payload == b"ping!"


def test_websocket_ping_and_close_are_answered() -> None:
    server = DatagramStream(Framing.WSS, client=False)
    assert server.receive(encode_ws_frame(b"hi", mask=b"abcd", opcode=0x9)) == []
    assert server.data_to_send() == encode_ws_frame(b"hi", opcode=0xA)
    assert server.receive(encode_ws_frame(b"\x03\xe8bye", mask=b"abcd", opcode=0x8)) == []
    assert server.closed and server.data_to_send() == encode_ws_frame(b"\x03\xe8", opcode=0x8)


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc2\x00",  # reserved bit
        b"\x83\x00",  # unknown data opcode
        b"\x09\x00",  # control frame without FIN
        b"\x89\x7e\x00\x80" + bytes(128),  # control frame over 125 bytes
        b"\x82\x7f" + (1 << 20).to_bytes(8, "big"),  # over the payload limit
    ],
)
def test_bad_websocket_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        WsDecoder().feed(frame)


def test_trickled_frame_costs_no_rescans() -> None:
    """A frame arriving byte by byte is not re-parsed per byte (amortised O(1) per byte)."""
    payload = os.urandom(60_000)
    wire = encode_len_u16_many([payload])
    decoder = LenU16Decoder()
    got: list[bytes] = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
    assert got == [payload]


# ------------------------------------------------------------------------------ Reality


def reality_acceptor(**kw: object) -> RealityAcceptor:
    return RealityAcceptor(
        private_key=PRIVATE,
        short_ids=[SHORT_ID],
        server_names=[SNI],
        **kw,  # type: ignore[arg-type]
    )


def reality_client(sni: str = SNI, short_id: bytes = SHORT_ID) -> RealityClient:
    return RealityClient(server_public=PUBLIC, short_id=short_id, sni=sni)


def open_pair(
    framing: Framing,
    reality: bool,
    sizes: list[int],
    acceptor: StreamAcceptor | None = None,
    pipelined: bytes = b"",
) -> tuple[StreamAccepted, StreamConnected]:
    """Run the opening in memory, every byte cut into ``sizes`` pieces both ways."""
    acceptor = acceptor or StreamAcceptor([b"other", KEY], reality_acceptor())
    connector = StreamConnector(
        framing=framing, access_key=KEY, host=SNI, reality=reality_client() if reality else None
    )
    connector.start(UNIX)
    verdict: StreamAccepted | StreamRefused | None = None
    connected: StreamConnected | None = None
    to_server = connector.data_to_send()
    to_client = b""
    for _ in range(10):
        for piece in split(to_server, sizes):
            if verdict is None:
                verdict = acceptor.receive(piece, UNIX)
            to_client += acceptor.data_to_send()
        to_server = b""
        if verdict is not None and pipelined:
            to_client += pipelined
            pipelined = b""
        for piece in split(to_client, sizes):
            if connected is None:
                connected = connector.receive(piece)
                to_server += connector.data_to_send()
            else:
                pipelined += piece
        to_client = b""
        if connected is not None and verdict is not None:
            break
    assert isinstance(verdict, StreamAccepted), verdict
    assert connected is not None
    return verdict, connected


@SETTINGS
@given(st.sampled_from(list(Framing)), st.booleans(), cuts, datagram_lists)
def test_opening_then_datagrams_both_ways(
    framing: Framing, reality: bool, sizes: list[int], datagrams: list[bytes]
) -> None:
    accepted, connected = open_pair(framing, reality, sizes)
    assert accepted.framing is framing
    assert (accepted.reality is not None) is reality
    assert accepted.key_index == (None if reality else 1)
    server = DatagramStream(framing, client=False, records=accepted.reality)
    client = DatagramStream(framing, client=True, records=connected.reality)
    assert server.receive_plaintext(accepted.leftover) == []
    assert client.receive_plaintext(connected.leftover) == []
    for sender, receiver in ((client, server), (server, client)):
        wire = sender.encode(datagrams)
        got = [d for piece in split(wire, sizes) for d in receiver.receive(piece)]
        assert got == datagrams


@SETTINGS
@given(cuts)
def test_reality_ccs_in_any_segmentation(sizes: list[int]) -> None:
    """Upstream's server takes the first data record for the CCS unless the CCS arrives in a
    read of its own; ours takes hello, CCS and the first records however they are cut."""
    client = reality_client()
    hello = client.hello(UNIX)
    acceptor = StreamAcceptor([KEY], reality_acceptor())
    verdict = None
    for piece in split(hello, sizes):
        verdict = acceptor.receive(piece, UNIX)
        assert verdict is None
    assert acceptor.data_to_send() == R.SERVER_FLIGHT
    assert client.receive(R.SERVER_FLIGHT) == []
    request = client.seal(b"GET /wss HTTP/1.1\r\n\r\n") + client.seal(b"\x82\x01x\x82\x00")
    datagrams: list[bytes] = []
    stream: DatagramStream | None = None
    for piece in split(request, sizes):
        if stream is None:
            verdict = acceptor.receive(piece, UNIX)
            if isinstance(verdict, StreamAccepted):
                assert verdict.framing is Framing.WSS
                stream = DatagramStream(Framing.WSS, client=False, records=verdict.reality)
                datagrams += stream.receive_plaintext(verdict.leftover)
        else:
            datagrams += stream.receive(piece)
    assert datagrams == [b"x", b""]


def test_directions_use_different_keystreams() -> None:
    accepted, connected = open_pair(Framing.STREAM, True, [10_000])
    assert accepted.reality is not None and connected.reality is not None
    same = b"identical plaintext both ways"
    up = connected.reality.seal(same)
    down = accepted.reality.seal(same)
    assert up[:5] == down[:5] and up[5:] != down[5:]


def test_replayed_or_forged_hello_is_refused_with_every_byte() -> None:
    shared = reality_acceptor()
    client = reality_client()
    hello = client.hello(UNIX)
    first = StreamAcceptor([KEY], shared)
    assert first.receive(hello, UNIX) is None and first.data_to_send() == R.SERVER_FLIGHT
    cases = {
        "replay": hello,
        "stale": reality_client().hello(UNIX - 120),
        "future": reality_client().hello(UNIX + 120),
        "sni": reality_client(sni="www.other.example").hello(UNIX),
        "short id": reality_client(short_id=bytes(8)).hello(UNIX),
        "flipped": hello[:50] + bytes((hello[50] ^ 1,)) + hello[51:],
        "browser": R.build_client_hello(SNI, os.urandom(32), os.urandom(32), os.urandom(32)),
    }
    for name, data in cases.items():
        acceptor = StreamAcceptor([KEY], shared)
        verdict = acceptor.receive(data + b"trailing", UNIX)
        assert isinstance(verdict, StreamRefused), name
        assert verdict.forwardable and verdict.tls and verdict.answer == b"", name
        assert verdict.received == data + b"trailing", name
        assert acceptor.data_to_send() == b"", name
    stats = shared.stats
    assert stats.accepted == 1 and stats.replay_drop == 1 and stats.timestamp_drop == 2
    assert stats.sni_drop == 1 and stats.short_id_drop == 1
    assert stats.auth_drop + stats.parse_drop + stats.key_drop == 2


def test_without_reality_tls_is_refused_and_http_gets_404() -> None:
    acceptor = StreamAcceptor([KEY])
    verdict = acceptor.receive(reality_client().hello(UNIX), UNIX)
    assert isinstance(verdict, StreamRefused) and verdict.tls and verdict.answer == b""
    for probe in (b"GET / HTTP/1.1\r\n\r\n", b"\x00\x01garbage", b"GET /stream HTTP/1.1\r\n\r\n"):
        verdict = StreamAcceptor([KEY]).receive(probe, UNIX)
        assert isinstance(verdict, StreamRefused)
        assert verdict.answer == b"HTTP/1.1 404 Not Found\r\n\r\n"
        assert verdict.received == probe


def test_request_head_is_bounded() -> None:
    acceptor = StreamAcceptor([KEY])
    head = b"GET /stream HTTP/1.1\r\nX-Pad: "
    verdict = None
    for _ in range(40):
        verdict = acceptor.receive(head if acceptor.received == 0 else b"a" * 1000, UNIX)
        if verdict is not None:
            break
    assert isinstance(verdict, StreamRefused) and acceptor.received < 16_384 + 1_000 + len(head)


def test_pipelined_datagrams_after_the_request_are_kept() -> None:
    token = make_token(KEY, int(UNIX))
    request = f"GET /stream HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"
    framed = encode_len_u16_many([b"one", b"two"])
    verdict = StreamAcceptor([KEY]).receive(request.encode() + framed, UNIX)
    assert isinstance(verdict, StreamAccepted) and verdict.leftover == framed


def test_client_refuses_404_and_non_ostp_answers() -> None:
    for answer in (b"HTTP/1.1 404 Not Found\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"SSH-2.0-x\r\n"):
        connector = StreamConnector(framing=Framing.STREAM, access_key=KEY, host=SNI)
        connector.start(UNIX)
        with pytest.raises(RemoteProtocolError):
            connector.receive(answer)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_fuzz_entry_points(data: bytes) -> None:
    fuzz_opening(data)
    fuzz_frames(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"GET /stream HTTP/1.1\r\n",
                    b"GET /wss HTTP/1.1\r\n",
                    b"Authorization: Bearer ",
                    b"\r\n\r\n",
                    b"\x16\x03\x01",
                    b"\x14\x03\x03\x00\x01\x01",
                    b"\x17\x03\x03\x00\x20",
                    b"\x82\x7e\xff\xff",
                    b"\x00\x05",
                ]
            ),
            st.binary(max_size=40),
        ),
        max_size=20,
    )
)
def test_fuzz_entry_points_with_structured_pieces(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    fuzz_opening(data)
    fuzz_frames(data)


# ------------------------------------------------------------------ reliable transport


@pytest.mark.parametrize("reliable", [False, True])
def test_reliable_transport_never_retransmits(reliable: bool) -> None:
    """Over TCP a withheld datagram is still in the stream: no probe, no re-send; ACKs flow."""
    config = ConnectionConfig(reliable_transport=reliable, keepalive_interval=None)
    client = ClientConnection(access_key=KEY, config=config)
    acceptor = ServerAcceptor([KEY])
    client.connect(0.0, UNIX)
    server = acceptor.accept(client.datagrams_to_send(0.0)[0], 0.0, UNIX)
    assert server is not None
    server.reliable_transport = reliable
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.01)
    client.send_data(1, b"x" * 20_000)
    withheld = client.datagrams_to_send(0.02)
    assert withheld
    now = 0.02
    while now < 5.0:  # the virtual clock runs through every timer for 5 s
        t = client.get_timer()
        now = max(now + 0.001, t if t is not None else now + 0.5)
        client.handle_timer(now)
        withheld += client.datagrams_to_send(now)
    retransmissions = client.sender.stats.retransmissions
    if reliable:
        assert retransmissions == 0 and client.sender.stats.probe_timeouts == 0
    else:
        assert retransmissions > 0  # the same run without the flag does re-send
    # the server still acknowledges what it receives (upstream peers need ACKs)
    for d in withheld:
        server.receive_datagram(d, now)
    got = b""
    while (ev := server.next_event()) is not None:
        if isinstance(ev, RelayMessageReceived):
            got += getattr(ev.message, "data", b"")
    assert len(got) == 20_000
    assert server.datagrams_to_send(now + 1.0)  # the ACK


@pytest.mark.parametrize("reliable", [False, True])
def test_path_change_sends_a_fresh_datagram_first(reliable: bool) -> None:
    """After a move (a new TCP connection, a new UDP port) the first datagram must be new to
    the peer: re-sent ones it already holds are duplicates, and a server re-binds a session
    only on a datagram that authenticates as new. Over TCP nothing else may come for long."""
    config = ConnectionConfig(reliable_transport=reliable, keepalive_interval=None)
    client = ClientConnection(access_key=KEY, config=config)
    client.connect(0.0, UNIX)
    server = ServerAcceptor([KEY]).accept(client.datagrams_to_send(0.0)[0], 0.0, UNIX)
    assert server is not None
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.01)
    client.send_data(1, b"y" * 5000)
    for d in client.datagrams_to_send(0.02):
        server.receive_datagram(d, 0.03)  # the server has it all; its ACK never arrives
    server.datagrams_to_send(0.05)
    before = server.stats.datagrams_received
    client.path_changed(0.1)
    moved = client.datagrams_to_send(0.1)
    assert moved
    server.receive_datagram(moved[0], 0.11)
    assert server.stats.datagrams_received == before + 1


def test_paused_receiver_recovers_at_once_over_a_reliable_transport() -> None:
    """A server whose remotes are slow refuses Data (receive_paused) while ACKs flow; over
    TCP the client does not re-send on timers, so one NACK on resume must bring back all of it
    (go-back-N), not one datagram per NACK."""
    config = ConnectionConfig(reliable_transport=True, keepalive_interval=None)
    client = ClientConnection(access_key=KEY, config=config)
    client.connect(0.0, UNIX)
    server = ServerAcceptor([KEY]).accept(client.datagrams_to_send(0.0)[0], 0.0, UNIX)
    assert server is not None
    server.reliable_transport = True
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.01)
    payload = os.urandom(40_000)
    client.send_data(1, payload)
    server.receive_paused = True
    for d in client.datagrams_to_send(0.02):
        server.receive_datagram(d, 0.03)  # all refused
    assert server.stats.paused_drop > 5
    server.receive_paused = False
    got = b""
    now = 0.05
    for d in server.datagrams_to_send(now):  # the NACK
        client.receive_datagram(d, now)
    for _ in range(3):  # three round trips, far less than any timer
        now += 0.01
        for d in client.datagrams_to_send(now):
            server.receive_datagram(d, now)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, RelayMessageReceived):
                got += getattr(ev.message, "data", b"")
        for d in server.datagrams_to_send(now):
            client.receive_datagram(d, now)
    assert got == payload
