"""Handshake and data exchange against the PyPI ``noiseprotocol`` package as an independent peer.

noiseprotocol (0.3.1) only plays the Noise part; everything OSTP adds around it (payload,
masked handshake datagram, transport-key split, data datagrams, frames, relay messages) is
built here from the spec (§3-§8) with the codec functions, so a fault on either side shows up.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from noise.connection import Keypair, NoiseConnection

from ostp_proto import (
    ClientConnection,
    ConnectionConfig,
    Data,
    HandshakeCompleted,
    KeepAlive,
    PaddingPolicy,
    Ping,
    Pong,
    RelayMessage,
    RelayMessageReceived,
    ServerAcceptor,
    ServerConnection,
    decode_relay,
    derive_secrets,
    encode_relay,
    parse_extension_hello,
    split_transport_keys,
)
from ostp_proto.arq import decode_ack, encode_ack
from ostp_proto.frames import FrameKind, decode_frame, encode_frame
from ostp_proto.obfuscation import (
    DataOpener,
    DataSealer,
    build_handshake_datagram,
    parse_handshake_datagram,
)

from .vectors import UPSTREAM, h

PROTOCOL = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
KEY = "0123456789abcdef0123456789abcdef"
UNIX = 1_700_000_000.0
HS = UPSTREAM["handshake"]
# noiseprotocol warns whenever an ephemeral key is fixed, which the vector tests must do
FIXED_EPHEMERAL = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")


class ScriptedRandom:
    """``random_bytes`` that hands out queued chunks (when the size matches), then seeded bytes."""

    def __init__(self, *chunks: bytes, seed: int = 5) -> None:
        self.chunks = deque(chunks)
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        if self.chunks and len(self.chunks[0]) == n:
            return self.chunks.popleft()
        return self.rng.randbytes(n)


def _noise(*, initiator: bool, psk: bytes, ephemeral: bytes | None = None) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_psks(psk=psk)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    if ephemeral is not None:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    conn.start_handshake()
    return conn


@dataclass
class DataPeer:
    """The data phase of the noiseprotocol side: our own nonces, sealer and opener."""

    sealer: DataSealer
    opener: DataOpener
    next_nonce: int = 0
    received_nonces: list[int] = field(default_factory=list)

    def frame(self, kind: int, stream_id: int, payload: bytes) -> bytes:
        datagram = self.sealer.seal(self.next_nonce, encode_frame(kind, stream_id, payload))
        self.next_nonce += 1
        return datagram

    def relay(self, stream_id: int, message: RelayMessage) -> bytes:
        return self.frame(FrameKind.DATA, stream_id, encode_relay(message))

    def open(self, datagram: bytes) -> tuple[int, int, bytes]:
        nonce = self.opener.unmask(datagram)
        assert nonce is not None, "the peer's datagram does not carry our session id"
        plaintext = self.opener.decrypt(nonce, datagram)
        assert plaintext is not None, "the peer's datagram does not authenticate"
        self.received_nonces.append(nonce)
        return decode_frame(plaintext)

    def open_all(self, datagrams: list[bytes]) -> list[tuple[int, int, bytes]]:
        return [self.open(d) for d in datagrams]


def _relays(frames: list[tuple[int, int, bytes]]) -> list[tuple[int, RelayMessage]]:
    return [(sid, decode_relay(p)) for kind, sid, p in frames if kind == FrameKind.DATA]


def _acked(frames: list[tuple[int, int, bytes]]) -> set[int]:
    out: set[int] = set()
    for kind, _sid, payload in frames:
        if kind == FrameKind.ACK:
            for start, end in decode_ack(payload):
                out.update(range(start, end + 1))
    return out


def _events(conn: ServerConnection | ClientConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


# ------------------------------------------------------------- noiseprotocol as the initiator


def _noise_client_handshake(
    acceptor: ServerAcceptor, sid: int, *, key: str = KEY, ephemeral: bytes | None = None
) -> tuple[ServerConnection, DataPeer, bytes]:
    secrets = derive_secrets(key)
    initiator = _noise(initiator=True, psk=secrets.psk, ephemeral=ephemeral)
    payload = int(UNIX).to_bytes(8, "big") + sid.to_bytes(4, "big") + key.encode()
    msg1 = bytes(initiator.write_message(payload))
    assert len(msg1) == 32 + len(payload) + 16
    padding = random.Random(sid).randbytes(secrets.handshake_pad_min + 3)
    datagram1 = build_handshake_datagram(secrets.obfuscation_key, sid, msg1, padding)
    server = acceptor.accept(datagram1, 0.0, UNIX + 1)
    assert server is not None, acceptor.stats
    assert server.session_id == sid
    [datagram2] = server.datagrams_to_send(0.0)
    got_sid, msg2 = parse_handshake_datagram(secrets.obfuscation_key, datagram2)
    assert got_sid == sid
    assert len(msg2) == 48  # spec §3: empty server payload
    assert bytes(initiator.read_message(msg2)) == b""
    assert initiator.handshake_finished
    send_key, recv_key = split_transport_keys(bytes(initiator.get_handshake_hash()))
    peer = DataPeer(
        DataSealer(secrets.obfuscation_key, send_key, sid),
        DataOpener(secrets.obfuscation_key, recv_key, sid),
    )
    return server, peer, datagram2


def test_noiseprotocol_initiator_against_server_acceptor() -> None:
    acceptor = ServerAcceptor(["another key", KEY], random_bytes=random.Random(1).randbytes)
    server, peer, _ = _noise_client_handshake(acceptor, 0xDEADBEEF)
    assert server.key_index == 1
    assert [type(e) for e in _events(server)] == [HandshakeCompleted]

    # Ping on stream 0 → Pong(same ts) on stream 0, and an ACK for nonce 0 (spec §7.3, §8).
    server.receive_datagram(peer.relay(0, Ping(1_700_000_000_123)), 0.010)
    assert _events(server) == []  # Ping is answered by the core, not surfaced
    frames = peer.open_all(server.datagrams_to_send(0.010))
    server.handle_timer(0.020)  # the delayed ACK (5 ms) is due by now
    frames += peer.open_all(server.datagrams_to_send(0.020))
    assert (0, Pong(1_700_000_000_123)) in _relays(frames)
    assert 0 in _acked(frames)

    # Data on a relay stream → RelayMessageReceived; and Data back from the server.
    server.receive_datagram(peer.relay(7, Data(b"hello from noiseprotocol")), 0.030)
    assert _events(server) == [RelayMessageReceived(7, Data(b"hello from noiseprotocol"))]
    server.send(7, Data(b"and back"))
    server.handle_timer(0.040)
    frames = peer.open_all(server.datagrams_to_send(0.040))
    assert (7, Data(b"and back")) in _relays(frames)
    assert {0, 1} <= _acked(frames)

    # The server's datagrams used contiguous nonces from 0, none twice.
    assert sorted(peer.received_nonces) == list(range(len(peer.received_nonces)))

    # Our ACK for everything it sent retires its history (nothing left to retransmit).
    top = max(peer.received_nonces)
    server.receive_datagram(peer.frame(FrameKind.ACK, 0, encode_ack([(0, top)])), 0.050)
    assert not server.sender.outstanding
    assert server.stats.datagram_auth_drop == server.stats.datagram_session_drop == 0
    assert server.stats.frame_decode_drop == server.stats.relay_decode_drop == 0


@FIXED_EPHEMERAL
def test_noiseprotocol_initiator_with_fixed_keys_reproduces_upstream_datagrams() -> None:
    # Upstream's own handshake (upstream-vectors.json): noiseprotocol builds message 1 with the
    # fixed initiator ephemeral; the acceptor answers with the fixed responder ephemeral, the
    # padding length and the padding bytes upstream chose, and both wire datagrams must match.
    key = UPSTREAM["access_key"]
    secrets = derive_secrets(key)
    msg2_pad = h(HS["msg2_pad"])
    pad_choice = len(msg2_pad) - secrets.handshake_pad_min  # randint(n) = u16 % (n + 1)
    acceptor = ServerAcceptor(
        [key],
        random_bytes=ScriptedRandom(
            h(HS["responder_ephemeral_private"]), pad_choice.to_bytes(2, "big"), msg2_pad
        ),
    )
    initiator = _noise(
        initiator=True, psk=secrets.psk, ephemeral=h(HS["initiator_ephemeral_private"])
    )
    msg1 = bytes(initiator.write_message(h(HS["client_handshake_payload"])))
    assert msg1.hex() == HS["noise_msg1"]
    datagram1 = build_handshake_datagram(
        secrets.obfuscation_key, HS["session_id"], msg1, h(HS["msg1_pad"])
    )
    assert datagram1.hex() == HS["msg1_datagram_wire"]
    server = acceptor.accept(datagram1, 0.0, float(HS["timestamp"]))
    assert server is not None, acceptor.stats
    [datagram2] = server.datagrams_to_send(0.0)
    assert datagram2.hex() == HS["msg2_datagram_wire"]
    _, msg2 = parse_handshake_datagram(secrets.obfuscation_key, datagram2)
    initiator.read_message(msg2)
    assert bytes(initiator.get_handshake_hash()).hex() == HS["handshake_hash"]
    send_key, recv_key = split_transport_keys(bytes(initiator.get_handshake_hash()))
    assert (send_key.hex(), recv_key.hex()) == (HS["client_send_key"], HS["server_send_key"])


def test_acceptor_rejects_noiseprotocol_message_under_a_wrong_psk() -> None:
    secrets = derive_secrets(KEY)
    initiator = _noise(initiator=True, psk=derive_secrets("other").psk)
    payload = int(UNIX).to_bytes(8, "big") + (9).to_bytes(4, "big") + KEY.encode()
    msg1 = bytes(initiator.write_message(payload))
    datagram = build_handshake_datagram(
        secrets.obfuscation_key, 9, msg1, bytes(secrets.handshake_pad_min)
    )
    acceptor = ServerAcceptor([KEY])
    assert acceptor.accept(datagram, 0.0, UNIX) is None
    assert acceptor.stats.no_key_drop == 1


# ------------------------------------------------------------- noiseprotocol as the responder


def _noise_server_handshake(
    client: ClientConnection, *, key: str = KEY, ephemeral: bytes | None = None
) -> tuple[DataPeer, bytes, NoiseConnection]:
    secrets = derive_secrets(key)
    [datagram1] = client.datagrams_to_send(0.0)
    sid, msg1 = parse_handshake_datagram(secrets.obfuscation_key, datagram1)
    pad = len(datagram1) - 6 - len(msg1)
    assert secrets.handshake_pad_min <= pad <= secrets.handshake_pad_max
    responder = _noise(initiator=False, psk=secrets.psk, ephemeral=ephemeral)
    payload = bytes(responder.read_message(msg1))
    assert payload[:8] == int(UNIX).to_bytes(8, "big")
    assert payload[8:12] == sid.to_bytes(4, "big")
    assert payload[12:] == key.encode()
    msg2 = bytes(responder.write_message(b""))
    assert responder.handshake_finished
    padding = bytes(secrets.handshake_pad_max)
    datagram2 = build_handshake_datagram(secrets.obfuscation_key, sid, msg2, padding)
    recv_key, send_key = split_transport_keys(bytes(responder.get_handshake_hash()))
    peer = DataPeer(
        DataSealer(secrets.obfuscation_key, send_key, sid),
        DataOpener(secrets.obfuscation_key, recv_key, sid),
    )
    return peer, datagram2, responder


def test_client_connection_against_noiseprotocol_responder() -> None:
    client = ClientConnection(
        access_key=KEY,
        session_id=0x01020304,
        config=ConnectionConfig(padding=PaddingPolicy.upstream_client()),
        random_bytes=random.Random(3).randbytes,
    )
    client.connect(0.0, UNIX)
    peer, datagram2, _ = _noise_server_handshake(client)
    client.receive_datagram(datagram2, 0.025)
    assert _events(client) == [HandshakeCompleted(0x01020304, 0.025)]

    # spec §10.1: the client sends a Ping on stream 0 right after the handshake, behind a
    # KeepAlive whose trailer offers ostp-py's extension (an upstream server ignores both).
    frames = peer.open_all(client.datagrams_to_send(0.025))
    [(stream0, keepalive), (stream, ping)] = _relays(frames)
    assert stream0 == 0 and isinstance(keepalive, KeepAlive)
    assert parse_extension_hello(frames[0][2]) is not None
    assert stream == 0 and isinstance(ping, Ping)
    assert abs(ping.timestamp - (UNIX + 0.025) * 1000) <= 1
    assert peer.received_nonces == [0, 1]
    client.receive_datagram(peer.relay(0, Pong(ping.timestamp)), 0.075)
    assert client.ping_rtt is not None and abs(client.ping_rtt - 0.05) < 0.002
    assert _events(client) == []  # Pong is consumed by the core
    # a Pong before any answer to the hello: an upstream server, no extension
    assert client.peer_extensions is None and not client.flow_control

    # Data both ways and ACKs from the noiseprotocol side.
    client.send(5, Data(b"GET / HTTP/1.1\r\n\r\n"))
    client.handle_timer(0.1)
    frames = peer.open_all(client.datagrams_to_send(0.1))
    assert (5, Data(b"GET / HTTP/1.1\r\n\r\n")) in _relays(frames)
    assert 0 in _acked(frames)  # our Pong (nonce 0) was acknowledged
    client.receive_datagram(peer.relay(5, Data(b"HTTP/1.1 200 OK\r\n")), 0.11)
    assert _events(client) == [RelayMessageReceived(5, Data(b"HTTP/1.1 200 OK\r\n"))]
    top = max(peer.received_nonces)
    client.receive_datagram(peer.frame(FrameKind.ACK, 0, encode_ack([(0, top)])), 0.12)
    assert not client.sender.outstanding
    assert sorted(peer.received_nonces) == list(range(len(peer.received_nonces)))
    assert client.stats.datagram_auth_drop == client.stats.frame_decode_drop == 0


@FIXED_EPHEMERAL
def test_client_with_fixed_keys_reproduces_upstream_message_1() -> None:
    key = UPSTREAM["access_key"]
    secrets = derive_secrets(key)
    msg1_pad = h(HS["msg1_pad"])
    pad_choice = len(msg1_pad) - secrets.handshake_pad_min
    client = ClientConnection(
        access_key=key,
        session_id=HS["session_id"],
        random_bytes=ScriptedRandom(
            h(HS["initiator_ephemeral_private"]), pad_choice.to_bytes(2, "big"), msg1_pad
        ),
    )
    client.connect(0.0, float(HS["timestamp"]))
    [datagram1] = client.datagrams_to_send(0.0)
    assert datagram1.hex() == HS["msg1_datagram_wire"]
    # noiseprotocol, with upstream's responder ephemeral, answers it; the client must accept.
    client2 = ClientConnection(
        access_key=key,
        session_id=HS["session_id"],
        random_bytes=ScriptedRandom(
            h(HS["initiator_ephemeral_private"]), pad_choice.to_bytes(2, "big"), msg1_pad
        ),
    )
    client2.connect(0.0, float(HS["timestamp"]))
    peer, datagram2, responder = _noise_server_handshake(
        client2, key=key, ephemeral=h(HS["responder_ephemeral_private"])
    )
    assert datagram2[6:54].hex() == HS["noise_msg2"]
    assert bytes(responder.get_handshake_hash()).hex() == HS["handshake_hash"]
    client2.receive_datagram(datagram2, 0.01)
    assert client2.established
    # its first data datagrams open with upstream's client send key
    frames = peer.open_all(client2.datagrams_to_send(0.01))
    assert [type(m) for _, m in _relays(frames)] == [KeepAlive, Ping]


def test_client_drops_noiseprotocol_reply_for_another_psk() -> None:
    client = ClientConnection(access_key=KEY, random_bytes=random.Random(4).randbytes)
    client.connect(0.0, UNIX)
    secrets = derive_secrets(KEY)
    [datagram1] = client.datagrams_to_send(0.0)
    sid, msg1 = parse_handshake_datagram(secrets.obfuscation_key, datagram1)
    wrong = _noise(initiator=False, psk=derive_secrets("other").psk)
    # a responder with the wrong PSK cannot even read message 1; forge message 2 with a
    # handshake of its own instead (right obfuscation, wrong Noise keys)
    other_init = _noise(initiator=True, psk=derive_secrets("other").psk)
    wrong.read_message(bytes(other_init.write_message(b"x" * 12)))
    msg2 = bytes(wrong.write_message(b""))
    client.receive_datagram(
        build_handshake_datagram(secrets.obfuscation_key, sid, msg2, bytes(20)), 0.01
    )
    assert not client.established
    assert client.stats.handshake_drop == 1
    assert len(msg1) == 32 + 12 + len(KEY) + 16
