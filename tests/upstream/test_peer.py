"""The upstream-behaviour peer itself: byte-exact against upstream's vectors, and its ARQ,
server and faults doing what spec §7-§10 say upstream does (the tests that use it are only as
good as it is)."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from ostp_proto import ClientConnection, Connect, ConnectOk, Pong, derive_secrets
from ostp_proto.arq import GAP_SKIP_AFTER, UPSTREAM_GIVE_UP
from ostp_proto.frames import FrameKind, PaddingPolicy, encode_frame
from ostp_proto.keys import Secrets
from ostp_proto.obfuscation import DataSealer

from ..proto.vectors import UPSTREAM, h
from .core import (
    GAP_SKIP,
    MAX_REORDER,
    MAX_REORDER_BUFFER,
    REMOTE_READ,
    TICK,
    Faults,
    Machine,
    OpenTcp,
    Randomness,
    UpstreamClient,
    UpstreamServer,
    ack_ranges,
    decode_ack,
    encode_ack,
)
from .harness import KEY, REFUSED, UNIX_EPOCH, World

HS = UPSTREAM["handshake"]
ADDRESS = ("192.0.2.7", 5555)
VECTOR_KEY: str = UPSTREAM["access_key"]


class Scripted(Randomness):
    """The choices the vectors were made with (ephemeral key, padding, reserved bytes)."""

    def __init__(
        self,
        *,
        ephemeral: bytes = bytes(32),
        handshake_pad: bytes = b"",
        session_id: int = 0,
        frames: list[tuple[bytes, int]] | None = None,
    ) -> None:
        super().__init__(random.Random(0).randbytes)
        self._ephemeral = ephemeral
        self._handshake_pad = handshake_pad
        self._session_id = session_id
        self._frames = list(frames or [])
        self._reserved = 0

    def ephemeral(self) -> bytes:
        return self._ephemeral

    def handshake_padding(self, secrets: Secrets) -> bytes:
        return self._handshake_pad

    def session_id(self) -> int:
        return self._session_id

    def frame_padding(self, policy: PaddingPolicy, payload_len: int) -> bytes:
        if not self._frames:  # past the scripted frames: random, as upstream
            self._reserved = super().reserved()
            return super().frame_padding(policy, payload_len)
        pad, self._reserved = self._frames.pop(0)
        return pad

    def reserved(self) -> int:
        return self._reserved


def _vectors(direction: str) -> list[dict[str, Any]]:
    return [v for v in UPSTREAM["data_datagrams"] if v["direction"] == direction]


def _machine(send_key: str, recv_key: str, frames: list[tuple[bytes, int]]) -> Machine:
    return Machine(
        secrets=derive_secrets(VECTOR_KEY),
        session_id=HS["session_id"],
        send_key=h(send_key),
        recv_key=h(recv_key),
        padding=PaddingPolicy.upstream_server(),
        mtu_hint=1350,
        randomness=Scripted(frames=frames),
        faults=Faults(),
        now=0.0,
    )


# ------------------------------------------------------------------------- upstream's vectors


def test_server_answers_the_vector_handshake_byte_for_byte() -> None:
    randomness = Scripted(
        ephemeral=h(HS["responder_ephemeral_private"]), handshake_pad=h(HS["msg2_pad"])
    )
    server = UpstreamServer([VECTOR_KEY], unix_offset=HS["timestamp"], randomness=randomness)
    server.receive_datagram(h(HS["msg1_datagram_wire"]), ADDRESS, 0.0)
    assert server.datagrams_to_send() == [(h(HS["msg2_datagram_wire"]), ADDRESS)]
    session = server.sessions[HS["session_id"]]
    # and it reads the vector client's datagrams: Connect, Data, Nack(5), Close
    wires = {v["label"]: h(v["datagram_wire"]) for v in _vectors("client_to_server")}
    server.receive_datagram(wires["client->server Connect"], ADDRESS, 0.001)
    assert server.take_effects() == [OpenTcp(session.token, 1, "127.0.0.1:7")]
    server.receive_datagram(wires["client->server Data"], ADDRESS, 0.002)
    assert server.stats.data_without_remote == 1  # spec §8: dropped before ConnectOk
    server.receive_datagram(wires["client->server Nack expected=5"], ADDRESS, 0.003)
    assert session.machine.stats.nacks_received == [(0.003, 5)]
    assert session.machine.stats.nacks_ignored == 1  # nonce 5 was never sent
    server.receive_datagram(wires["client->server Close"], ADDRESS, 0.004)
    assert session.machine.closed  # at once; nothing after it is processed


@pytest.mark.parametrize(
    ("direction", "send_key", "recv_key"),
    [
        ("client_to_server", "client_send_key", "client_recv_key"),
        ("server_to_client", "server_send_key", "server_recv_key"),
    ],
)
def test_machine_builds_the_vector_datagrams(direction: str, send_key: str, recv_key: str) -> None:
    vectors = _vectors(direction)
    machine = _machine(
        HS[send_key], HS[recv_key], [(h(v["padding"]), v["reserved"]) for v in vectors]
    )
    for v in vectors:
        payload = h(v["payload"])
        if v["frame_kind"] == FrameKind.ACK:
            assert encode_ack(ack_ranges(2, [])) == payload  # nonces 0 and 1 arrived
        elif v["frame_kind"] == FrameKind.NACK:
            assert struct.pack(">Q", 5) == payload
        nonce = machine.send(v["frame_kind"], v["stream_id"], payload, 0.0)
        assert nonce == v["nonce"]
        assert machine.take_output() == [h(v["datagram_wire"])], v["label"]


def test_client_role_sends_the_vector_message_1() -> None:
    randomness = Scripted(
        ephemeral=h(HS["initiator_ephemeral_private"]),
        handshake_pad=h(HS["msg1_pad"]),
        session_id=HS["session_id"],
    )
    client = UpstreamClient(VECTOR_KEY, unix_offset=HS["timestamp"], randomness=randomness)
    client.connect(0.0)
    assert client.datagrams_to_send() == [h(HS["msg1_datagram_wire"])]


def test_ack_and_nack_payloads_match_spec_v8() -> None:
    ranges = ack_ranges(5, [7, 8, 10])
    assert encode_ack(ranges).hex() == (
        "03" + "0000000000000000"
        "0000000000000004"
        "0000000000000007"
        "0000000000000008"
        "000000000000000a"
        "000000000000000a"
    )
    assert decode_ack(encode_ack(ranges)) == ranges
    # more than 8 ranges: the cumulative one and the last 7 (spec §7.3)
    many = ack_ranges(1, list(range(2, 40, 2)))
    assert many[0] == (0, 0) and many[1:] == [(n, n) for n in range(26, 40, 2)]


# ----------------------------------------------------------------------------- ARQ (spec §7)

_SECRETS = derive_secrets(KEY)
_KEY_A = bytes(range(32))
_KEY_B = bytes(range(32, 64))


def _upstream(faults: Faults | None = None) -> Machine:
    """An upstream machine that sends with key A and receives with key B."""
    return Machine(
        secrets=_SECRETS,
        session_id=9,
        send_key=_KEY_A,
        recv_key=_KEY_B,
        padding=PaddingPolicy.upstream_server(),
        mtu_hint=1350,
        randomness=Randomness(random.Random(1).randbytes),
        faults=faults or Faults(),
        now=0.0,
    )


def _from_peer(nonce: int, kind: int = FrameKind.DATA, payload: bytes = b"\x03") -> bytes:
    """The peer's datagram ``nonce`` (a KeepAlive relay message unless told otherwise)."""
    frame = encode_frame(kind, 0 if kind != FrameKind.DATA else 1, payload)
    return DataSealer(_SECRETS.obfuscation_key, _KEY_B, 9).seal(nonce, frame)


def _feed(machine: Machine, nonce: int, now: float, **kw: Any) -> None:
    machine.receive(_from_peer(nonce, **kw), nonce, now)


def _said(machine: Machine) -> list[tuple[int, bytes]]:
    """(kind, payload) of what ``machine`` sent since the last call."""
    opener = Machine(
        secrets=_SECRETS,
        session_id=9,
        send_key=_KEY_B,
        recv_key=_KEY_A,
        padding=PaddingPolicy.none(),
        mtu_hint=1350,
        randomness=Randomness(),
        faults=Faults(),
        now=0.0,
    ).opener
    out = []
    for datagram in machine.take_output():
        nonce = opener.unmask(datagram)
        assert nonce is not None
        plaintext = opener.decrypt(nonce, datagram)
        assert plaintext is not None
        out.append((plaintext[1], plaintext[12 : 12 + int.from_bytes(plaintext[6:10], "big")]))
    return out


def _ticks(until: float) -> list[float]:
    return [round(k * TICK, 6) for k in range(1, round(until / TICK) + 1)]


def test_a_lost_frame_is_resent_on_the_fixed_schedule_then_evicted() -> None:
    machine = _upstream()
    machine.send_stream_data(1, b"x" * 100, 0.0)
    first = machine.take_output()
    resent: list[float] = []
    evicted_at = None
    for now in _ticks(2.0):
        machine.tick(now)
        out = machine.take_output()
        if out:
            assert out == first  # the same bytes, the same nonce
            resent.append(now)
        if evicted_at is None and machine.stats.evicted:
            evicted_at = now
    # spec §7.2: +100 ... +800 ms, +900, +1100, +1500 ms, then gone at the next tick
    assert resent == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.5])
    assert evicted_at is not None and evicted_at == pytest.approx(1.51)
    # what our receiver's bound is derived from (ostp_proto.arq), with room to spare
    assert evicted_at <= UPSTREAM_GIVE_UP < GAP_SKIP_AFTER


def test_the_tick_budget_suppresses_resends_but_counts_their_retries() -> None:
    machine = _upstream()
    for _ in range(100):
        machine.send_stream_data(1, b"y" * 100, 0.0)
    machine.take_output()
    assert machine.cc.budget == 2  # clamp(10 packets // 4, 2, 64)
    machine.tick(0.1)
    assert len(machine.take_output()) == 2
    assert machine.stats.budget_suppressed == 98
    assert all(e.retries == 1 for e in machine.history.values())
    for now in _ticks(1.6):
        machine.tick(now)
    # everything was given up after ~1.5 s though only two were re-sent per tick
    assert machine.stats.evicted == 100 and not machine.history
    assert machine.stats.timer_resends <= 2 * len(_ticks(1.6))


def test_a_nack_resends_at_once_and_shrinks_the_window() -> None:
    machine = _upstream()
    nonces = [machine.send_stream_data(1, bytes([i]) * 50, 0.0) for i in range(4)]
    sent = machine.take_output()
    cwnds = []
    for i, nonce in enumerate(nonces):
        assert nonce is not None
        _feed(machine, i, 0.01 * (i + 1), kind=FrameKind.NACK, payload=struct.pack(">Q", nonce))
        out = machine.take_output()
        assert sent[nonce] in out  # re-sent at once, unchanged
        cwnds.append(machine.cc.cwnd)
    # slow start halves once, then x0.7 per NACK down to 2 x mtu (spec §7.4)
    assert cwnds == [6750, 6750 * 7 // 10, 6750 * 7 // 10 * 7 // 10, 2700]
    assert machine.history[0].retries == 1


def test_a_nack_for_an_evicted_nonce_is_ignored() -> None:
    machine = _upstream()
    machine.send_stream_data(1, b"z", 0.0)
    for now in _ticks(1.6):
        machine.tick(now)
    machine.take_output()
    assert machine.stats.evicted == 1
    _feed(machine, 0, 1.7, kind=FrameKind.NACK, payload=struct.pack(">Q", 0))
    assert [kind for kind, _ in _said(machine)] != [FrameKind.DATA]  # nothing re-sent
    assert machine.stats.nacks_ignored == 1


def test_a_duplicate_is_acknowledged_at_once() -> None:
    machine = _upstream()
    _feed(machine, 0, 0.0)
    assert [k for k, _ in _said(machine)] == [FrameKind.ACK]
    _feed(machine, 0, 0.001)  # 1 ms later: no ACK delay, no rate limit for duplicates
    assert _said(machine) == [(FrameKind.ACK, encode_ack([(0, 0)]))]
    assert machine.stats.duplicates == 1


def test_out_of_order_arrivals_nack_the_expected_nonce_every_30_ms() -> None:
    machine = _upstream()
    _feed(machine, 1, 0.000)  # 0 is missing
    _feed(machine, 2, 0.010)
    _feed(machine, 3, 0.031)
    nacks = [p for k, p in _said(machine) if k == FrameKind.NACK]
    assert nacks == [struct.pack(">Q", 0)] * 2  # at 0 and 31 ms, not at 10 ms


def test_the_receiver_skips_a_gap_after_500_ms_on_the_tick() -> None:
    machine = _upstream()
    _feed(machine, 0, 0.0)
    machine.take_inbox()
    _feed(machine, 2, 0.1)  # 1 is lost for good
    for now in _ticks(0.6):
        machine.tick(now)
        if machine.stats.gap_skips:
            break
    # spec §7.3: more than 500 ms without an advance (the last was at 0.0)
    assert now == pytest.approx(GAP_SKIP + TICK)
    assert machine.expected == 3 and machine.stats.skipped_nonces == 1
    assert machine.take_inbox() == [(1, b"\x03")]  # delivered over the hole, silently


def test_the_reorder_buffer_and_window_limits() -> None:
    machine = _upstream()
    for nonce in range(1, MAX_REORDER_BUFFER + 2):
        _feed(machine, nonce, 0.0)
    assert len(machine.buffer) == MAX_REORDER_BUFFER
    assert machine.stats.buffer_full_drops == 1
    machine.take_output()
    _feed(machine, MAX_REORDER + 1, 0.0)  # beyond exp + 16384: NACK(exp), not decrypted
    assert machine.stats.window_drops == 1
    assert _said(machine) == [(FrameKind.NACK, struct.pack(">Q", 0))]


# ------------------------------------------------------------------------- faults (for tests)


def test_a_dropped_nonce_is_never_delivered_however_often_it_is_sent() -> None:
    machine = _upstream(Faults(drop_nonces={0}))
    machine.send_stream_data(1, b"lost", 0.0)
    machine.send_stream_data(1, b"kept", 0.0)
    assert len(machine.take_output()) == 1
    _feed(machine, 0, 0.05, kind=FrameKind.NACK, payload=struct.pack(">Q", 0))
    for now in _ticks(2.0):
        machine.tick(now)
    # the first transmission and 11 re-sends (the NACK's counts as one of them), all lost
    assert machine.stats.fault_drops == 1 + 11
    assert machine.stats.evicted_nonces == [0, 1]


def test_mute_after_stops_all_output() -> None:
    machine = _upstream(Faults(mute_after=3))
    for i in range(5):
        machine.send_stream_data(1, bytes([i]), 0.0)
    assert len(machine.take_output()) == 3 and machine.stats.muted == 2


# ------------------------------------------------------------------------- server (spec §9)


def test_server_relays_for_our_client_like_upstream() -> None:
    world = World()
    world.handshake()
    record = world.connect(1)
    assert record.ok_at is not None
    world.get(1, 10_000)
    world.run_until(lambda: record.received >= 10_000, 5.0)
    assert record.received == 10_000 and not record.corrupt
    session = next(iter(world.server.sessions.values()))
    # remote reads of 4,096 bytes, each one Data frame (the origin read 4096 + 4096 + 1808)
    assert session.machine.stats.datagrams_built >= 3
    world.run_for(6.0)  # a keepalive round: Ping on stream 0, answered with Pong
    assert world.client.ping_rtt is not None
    refused = world.open(2, REFUSED)
    world.run_until(lambda: refused.error is not None, world.now + 1.0)
    assert refused.error == "connect failed: refused" and refused.ok_at is None


def test_server_cuts_remote_data_into_4096_byte_frames() -> None:
    world = World()
    world.handshake()
    world.connect(1)
    session = next(iter(world.server.sessions.values()))
    before = session.machine.stats.datagrams_built
    world.server.tcp_data(session.token, 1, bytes(3 * REMOTE_READ + 1), world.now)
    assert session.machine.stats.datagrams_built - before == 4


def test_server_refuses_replays_and_stale_timestamps() -> None:
    client = ClientConnection(access_key=KEY, random_bytes=random.Random(3).randbytes)
    client.connect(0.0, UNIX_EPOCH)
    [hello] = client.datagrams_to_send(0.0)
    server = UpstreamServer([KEY], unix_offset=UNIX_EPOCH)
    server.receive_datagram(hello, ADDRESS, 0.0)
    assert len(server.datagrams_to_send()) == 1
    server.receive_datagram(hello, ("192.0.2.8", 1), 0.1)  # the same message 1 again
    assert server.datagrams_to_send() == [] and server.stats.replays == 1
    late = UpstreamServer([KEY], unix_offset=UNIX_EPOCH + 301.0)
    late.receive_datagram(hello, ADDRESS, 0.0)
    assert late.datagrams_to_send() == [] and not late.sessions


def test_server_drops_idle_sessions_after_600_s_without_telling_the_client() -> None:
    world = World()
    world.handshake()
    world.connect(1)
    token = next(iter(world.server.sessions.values())).token
    world.c2s_drop = lambda _index, _datagram: True  # the client goes away
    world.run_until(lambda: False, 599.0)
    assert world.server.sessions and world.remote_open(token, 1)
    sent = world.s2c_sent
    world.run_until(lambda: not world.server.sessions, 700.0)
    assert world.now == pytest.approx(600.0, abs=0.1)  # spec §9.3: idle > 600 s
    assert world.server.stats.sessions_evicted == 1
    assert not world.remote_open(token, 1)  # its remote closed
    assert world.s2c_sent == sent  # no Close, nothing at all, for the client


def test_ignore_connect_answers_pings_but_never_connect() -> None:
    world = World(faults=Faults(ignore_connect=True))
    world.handshake()
    record = world.connect(1, limit=6.0)
    assert record.ok_at is None and record.error is None
    assert world.client.ping_rtt is not None  # the keepalive at 5 s got its Pong
    assert world.server.stats.connects_ignored == 1


def test_upstream_client_role_meets_our_server() -> None:
    from ostp_proto import RelayMessageReceived, ServerAcceptor

    acceptor = ServerAcceptor([KEY], random_bytes=random.Random(4).randbytes)
    client = UpstreamClient(KEY, unix_offset=UNIX_EPOCH, randomness=Randomness())
    client.connect(0.0)
    [hello] = client.datagrams_to_send()
    server = acceptor.accept(hello, 0.0, UNIX_EPOCH)
    assert server is not None
    now = 0.0
    for datagram in server.datagrams_to_send(now):
        client.receive_datagram(datagram, now)
    assert client.established
    client.send(1, Connect("192.0.2.10:80"), now)
    got = []
    for _ in range(700):  # 7 s: the Ping at once and the keepalive at 5 s
        now = round(now + TICK, 6)
        for datagram in client.datagrams_to_send():
            server.receive_datagram(datagram, now)
        server.handle_timer(now)
        while (event := server.next_event()) is not None:
            if isinstance(event, RelayMessageReceived):
                got.append(event.message)
                if isinstance(event.message, Connect):
                    server.send(1, ConnectOk())
        for datagram in server.datagrams_to_send(now):
            client.receive_datagram(datagram, now)
        client.handle_timer(now)
    assert got[0] == Connect("192.0.2.10:80")
    assert (1, ConnectOk()) in client.inbox
    pongs = [m for s, m in client.inbox if s == 0]
    assert len(pongs) == 2 and all(isinstance(m, Pong) for m in pongs)
