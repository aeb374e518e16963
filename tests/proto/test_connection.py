"""Client and server cores against each other in memory, with faults and a virtual clock."""

from __future__ import annotations

import hashlib
import random

import pytest

from ostp_proto import (
    Close,
    Connect,
    ConnectionConfig,
    ConnectionTerminated,
    ConnectOk,
    LocalProtocolError,
    PaddingPolicy,
    RelayMessageReceived,
    State,
    UdpData,
)

from .harness import Faults, Pair

SIZE = 5 * 1024 * 1024


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _check_transfer(pair: Pair, up: bytes, down: bytes) -> None:
    assert pair.cpeer.terminated is None, pair.cpeer.terminated
    assert pair.speer.terminated is None, pair.speer.terminated
    assert pair.cpeer.lost == pair.speer.lost == 0
    got_up = bytes(pair.speer.received[1])
    got_down = bytes(pair.cpeer.received[1])
    assert len(got_up) == len(up) and hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert len(got_down) == len(down)
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()


@pytest.mark.parametrize("loss", [0.0, 0.02, 0.10, 0.30])
def test_five_megabytes_each_way_under_loss(loss: float) -> None:
    # at 30 % loss each way a handshake round trip fails half the time: allow more attempts
    config = ConnectionConfig(padding=PaddingPolicy.none(), handshake_attempts=20)
    pair = Pair(
        c2s=Faults(loss=loss), s2c=Faults(loss=loss), seed=int(loss * 100) + 7, client_config=config
    )
    up, down = _payload(SIZE, 1), _payload(SIZE, 2)
    pair.transfer(up, down)
    _check_transfer(pair, up, down)
    if loss:
        assert pair.client.sender.stats.retransmissions > 0
        assert pair.server is not None and pair.server.sender.stats.retransmissions > 0


def test_duplication_reordering_and_corruption() -> None:
    def faults() -> Faults:
        return Faults(loss=0.03, duplicate=0.05, reorder=0.10, corrupt=0.02)

    pair = Pair(c2s=faults(), s2c=faults(), seed=11)
    up, down = _payload(SIZE, 3), _payload(SIZE, 4)
    pair.transfer(up, down)
    _check_transfer(pair, up, down)
    assert pair.server is not None
    stats = [pair.client.receiver.stats, pair.server.receiver.stats]
    assert all(s.duplicate_drop > 0 for s in stats)
    # a flipped bit fails the mask check or the AEAD: dropped, counted, never delivered
    drops = [pair.client.stats, pair.server.stats]
    assert all(d.datagram_auth_drop + d.datagram_session_drop > 0 for d in drops)


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_handshake_survives_loss_of_either_datagram(direction: str) -> None:
    lost = Faults(drop_first=1)
    pair = Pair(c2s=lost if direction == "c2s" else None, s2c=lost if direction == "s2c" else None)
    pair.handshake()
    assert pair.now >= 1.2  # it took a retry
    assert pair.acceptor.stats.accepted == (1 if direction == "c2s" else 2)
    up, down = _payload(100_000, 5), _payload(100_000, 6)
    pair.transfer(up, down)
    _check_transfer(pair, up, down)


def test_handshake_retry_is_a_fresh_handshake() -> None:
    pair = Pair(s2c=Faults(drop_first=10))
    sent: list[bytes] = []
    for _ in range(3):
        sent += pair.client.datagrams_to_send(pair.now)
        pair.now += 1.3
        pair.client.handle_timer(pair.now)
    assert len(sent) == 3 and len(set(sent)) == 3
    assert len({d[6:38] for d in sent}) == 3  # a new ephemeral key each time


def test_handshake_gives_up_after_attempts() -> None:
    pair = Pair(c2s=Faults(loss=1.0))
    pair.run_until(lambda: pair.cpeer.terminated is not None, 30.0)
    assert pair.cpeer.terminated is not None and "handshake" in pair.cpeer.terminated
    assert pair.c2s.sent == 4


def test_silent_peer_is_detected() -> None:
    pair = Pair()
    pair.handshake()
    start = pair.now
    pair.s2c.blackhole = True
    pair.run_until(lambda: pair.cpeer.terminated is not None, 120.0)
    assert pair.cpeer.terminated is not None and "idle" in pair.cpeer.terminated
    assert 25.0 <= pair.now - start <= 26.0
    assert pair.client.state is State.CLOSED


def test_keepalive_pings_measure_rtt() -> None:
    pair = Pair(latency=0.02)
    pair.handshake()
    pair.run_until(lambda: pair.now > 12.0, 13.0)
    assert pair.client.ping_rtt is not None
    assert 0.039 <= pair.client.ping_rtt <= 0.08
    assert pair.cpeer.terminated is None and pair.speer.terminated is None


def test_rtt_sampled_at_follows_the_pongs_and_stops_with_them() -> None:
    """``rtt_sampled_at`` is renewed by every Pong (keepalive every 5 s) and ages once the
    server stops answering: what the client's health check and status rely on."""
    pair = Pair(latency=0.02)
    pair.handshake()
    assert pair.client.rtt_sampled_at is not None
    assert pair.client.rtt_sampled_at <= pair.now
    pair.run_until(lambda: pair.now > 11.0, 12.0)
    sampled = pair.client.rtt_sampled_at
    assert sampled is not None and pair.now - sampled <= 5.0 + 0.1
    pair.s2c.blackhole = True
    pair.run_until(lambda: pair.now > 22.0, 23.0)
    assert pair.client.rtt_sampled_at is not None
    assert pair.client.rtt_sampled_at <= sampled + 5.0 + 0.1  # no sample since the blackhole
    assert pair.now - pair.client.rtt_sampled_at > 10.0


def test_relay_messages_cross_in_order() -> None:
    pair = Pair(c2s=Faults(loss=0.2, reorder=0.3), s2c=Faults(loss=0.2), seed=3)
    pair.handshake()
    assert pair.server is not None
    pair.client.send(5, Connect("example.com:443"))
    pair.client.send(6, UdpData("[2001:db8::1]:53", b"\x00\x01"))
    pair.client.send(5, Close())
    pair.server.send(5, ConnectOk())
    pair.run_until(lambda: len(pair.speer.events) >= 4 and len(pair.cpeer.events) >= 2, 30.0)
    got = [
        (e.stream_id, e.message) for e in pair.speer.events if isinstance(e, RelayMessageReceived)
    ]
    assert got == [
        (5, Connect("example.com:443")),
        (6, UdpData("[2001:db8::1]:53", b"\x00\x01")),
        (5, Close()),
    ]
    assert (5, ConnectOk()) in [
        (e.stream_id, e.message) for e in pair.cpeer.events if isinstance(e, RelayMessageReceived)
    ]


def test_close_reaches_the_peer() -> None:
    pair = Pair()
    pair.handshake()
    pair.client.close(pair.now)
    pair.run_until(lambda: pair.speer.terminated is not None, 5.0)
    assert pair.speer.terminated == "closed by peer"
    assert any(isinstance(e, ConnectionTerminated) for e in pair.cpeer.events)
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(1, b"x")


def test_nonce_exhaustion_terminates_instead_of_reusing() -> None:
    pair = Pair()
    pair.handshake()
    pair.client.sender.next_nonce = 2**64 - 2
    pair.client.send_data(1, b"a" * 5000)
    out = pair.client.datagrams_to_send(pair.now)
    assert len(out) == 2  # nonces 2^64-2 and 2^64-1, then nothing
    assert pair.client.state is State.CLOSED
    events = []
    while (ev := pair.client.next_event()) is not None:
        events.append(ev)
    assert any(isinstance(e, ConnectionTerminated) and "nonce" in e.reason for e in events)


def test_backpressure_bounds_the_send_buffer() -> None:
    config = ConnectionConfig(padding=PaddingPolicy.none(), send_buffer_limit=100_000)
    pair = Pair(client_config=config)
    pair.handshake()
    while pair.client.writable:
        pair.client.send_data(1, bytes(10_000))
    assert pair.client.send_buffer_bytes < 100_000 + 10_100
    pair.run_until(lambda: pair.client.writable, 5.0)
    assert pair.client.writable


def test_gap_the_peer_gave_up_on_is_reported_not_hidden() -> None:
    """An upstream peer gives up on a frame: the hole is reported, never delivered over."""
    pair = Pair()
    pair.handshake()
    assert pair.server is not None
    server = pair.server
    server.send_data(1, b"A" * 1000)
    lost = server.datagrams_to_send(pair.now)
    # forget it as upstream does after its retries, so it is never re-sent
    for d in lost:
        assert d
    server.sender.outstanding.clear()
    server.sender.bytes_in_flight = 0
    pair.step()
    for i in range(400):
        server.send_data(1, bytes([66 + i % 20]) * 100)
        pair.run_until(lambda t=pair.now: pair.now >= t + 0.02, pair.now + 0.03)
        if pair.cpeer.lost:
            break
    assert pair.cpeer.lost >= 1
    assert b"A" not in bytes(pair.cpeer.received[1])


def test_path_change_resends_in_flight_without_backoff() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.server is not None
    pair.s2c.blackhole = True
    pair.server.send_data(1, bytes(50_000))
    pair.run_until(lambda: pair.server is not None and pair.server.sender.pto_count >= 3, 30.0)
    lost_at = pair.now
    pair.s2c.blackhole = False
    pair.server.path_changed(pair.now)
    pair.run_until(lambda: len(pair.cpeer.received[1]) >= 50_000, pair.now + 5.0)
    assert len(pair.cpeer.received[1]) == 50_000
    assert pair.now - lost_at < 0.2  # not the backed-off timeout of 0.5 s and more


def test_receive_pause_drops_data_but_keeps_acks_flowing() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.server is not None
    server = pair.server
    server.receive_paused = True
    pair.client.send_data(1, b"u" * 20_000)  # client -> server: paused, not taken
    server.send_data(1, b"d" * 20_000)  # server -> client: needs the client's ACKs
    pair.run_until(lambda: len(pair.cpeer.received[1]) >= 20_000, pair.now + 2.0)
    assert len(pair.cpeer.received[1]) == 20_000  # our own sending did not wait on the pause
    pair.run_until(lambda: not server.sender.outstanding, pair.now + 1.0)
    assert not server.sender.outstanding  # the client's ACKs got through
    assert len(pair.speer.received[1]) == 0 and server.stats.paused_drop > 0
    pair.run_until(lambda: pair.now > 3.0, 3.1)
    resumed = pair.now
    server.receive_paused = False  # NACKs at once for what was dropped
    pair.run_until(lambda: len(pair.speer.received[1]) >= 20_000, pair.now + 5.0)
    assert bytes(pair.speer.received[1]) == b"u" * 20_000
    assert pair.now - resumed < 0.1  # not the client's backed-off retransmission timeout
