"""Path MTU discovery wired into the connection (RFC 8899): probes, raise, fallback, holes.

Both cores run against each other on the in-memory links of ``harness.Pair``; a link's ``mtu``
makes every larger datagram vanish, as a path that drops IP fragments does. A lost probe leaves a
hole in the peer's nonce sequence; between two ostp-py peers the sender gives that nonce up
explicitly (Abandoned, relay tag 0x41), so no hole ever expires into a ``DataLost``.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto import (
    ConnectionConfig,
    DataLost,
    PaddingPolicy,
    PmtudConfig,
    PmtudState,
    ServerConnection,
)
from ostp_proto.connection import SERVER_DEFAULTS
from ostp_proto.obfuscation import unmask_data_header
from ostp_proto.pmtud import BASE_PLPMTU, MAX_UDP_PAYLOAD

from ..upstream.harness import World
from .harness import KEY, Faults, Pair

CEILING = MAX_UDP_PAYLOAD
V4_1500 = 1500 - 28


def _configs(
    *, extensions: bool = True, ceiling: int = CEILING
) -> tuple[ConnectionConfig, ConnectionConfig]:
    pm = PmtudConfig()
    client = ConnectionConfig(
        padding=PaddingPolicy.upstream_client(),
        max_datagram_size=ceiling,
        pmtud=pm,
        extensions=extensions,
    )
    server = replace(SERVER_DEFAULTS, max_datagram_size=ceiling, pmtud=pm, extensions=extensions)
    return client, server


def _pair(
    c2s_mtu: int | None = None,
    s2c_mtu: int | None = None,
    *,
    extensions: bool = True,
    seed: int = 1,
    c2s: Faults | None = None,
    s2c: Faults | None = None,
) -> Pair:
    client, server = _configs(extensions=extensions)
    pair = Pair(client_config=client, server_config=server, seed=seed, c2s=c2s, s2c=s2c)
    pair.c2s.mtu = c2s_mtu
    pair.s2c.mtu = s2c_mtu
    return pair


def _server(pair: Pair) -> ServerConnection:
    assert pair.server is not None
    return pair.server


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _lost(pair: Pair) -> list[object]:
    return [e for e in pair.cpeer.events + pair.speer.events if isinstance(e, DataLost)]


def _settled(pair: Pair) -> bool:
    conns = [pair.client] + ([pair.server] if pair.server is not None else [])
    return len(conns) == 2 and all(
        c.pmtud is not None and c.pmtud.state is PmtudState.SEARCH_COMPLETE for c in conns
    )


def test_an_open_path_climbs_to_the_ceiling_both_ways() -> None:
    pair = _pair()
    pair.handshake()
    pair.run_until(lambda: _settled(pair), 5.0)  # one round trip per probe: base, ceiling
    assert pair.now < 0.2
    up, down = _data(300_000, 1), _data(2_000_000, 2)
    pair.transfer(up, down, limit=60)
    server = _server(pair)
    assert pair.speer.received[1] == up and pair.cpeer.received[1] == down
    for conn in (pair.client, server):
        assert conn.pmtud is not None
        assert conn.pmtud.state is PmtudState.SEARCH_COMPLETE
        assert conn.datagram_size == CEILING
        assert conn.pmtud.stats.probes_lost == 0
    # the bulk went in datagrams of the ceiling's size
    assert server.stats.bytes_sent < 2_100_000 and server.sender.stats.datagrams_sent < 200
    assert not _lost(pair)


def test_datagrams_start_at_the_base_and_grow_only_after_a_probe_is_acknowledged() -> None:
    pair = _pair()
    pair.handshake()
    assert pair.client.datagram_size == BASE_PLPMTU
    sizes: list[int] = []
    original = pair.c2s.push

    def push(data: bytes, now: float) -> None:
        sizes.append(len(data))
        original(data, now)

    pair.c2s.push = push  # type: ignore[method-assign]
    pair.run_until(lambda: pair.client.datagram_size == CEILING, 5.0)
    assert pair.client.datagram_size == CEILING
    assert BASE_PLPMTU in sizes and CEILING in sizes  # the probes: base, then the ceiling
    assert sizes.index(BASE_PLPMTU) < sizes.index(CEILING)


def test_a_1500_byte_path_settles_at_1472_and_lost_probes_never_lose_data() -> None:
    pair = _pair(c2s_mtu=V4_1500, s2c_mtu=V4_1500)
    up, down = _data(500_000, 3), _data(3_000_000, 4)
    pair.transfer(up, down, limit=120)
    pair.run_until(lambda: _settled(pair), pair.now + 30)
    server = _server(pair)
    pair.run_until(  # the last Abandoned may still be on its way
        lambda: (
            server.stats.abandoned_received == pair.c2s.too_big
            and pair.client.stats.abandoned_received == pair.s2c.too_big
        ),
        pair.now + 5,
    )
    assert pair.speer.received[1] == up and pair.cpeer.received[1] == down
    for conn in (pair.client, server):
        pm = conn.pmtud
        assert pm is not None and pm.state is PmtudState.SEARCH_COMPLETE
        assert conn.datagram_size == V4_1500
        assert pm.stats.probes_lost >= 3  # the ceiling (65507) three times, then 4352 - 28
        # (a base probe that data confirmed first is given up too, though it arrived)
        assert conn.stats.probes_abandoned >= pm.stats.probes_lost
    # every probe the path ate closed its hole at the peer as an abandoned nonce
    assert pair.c2s.too_big == pair.client.pmtud.stats.probes_lost  # type: ignore[union-attr]
    assert pair.s2c.too_big == server.pmtud.stats.probes_lost  # type: ignore[union-attr]
    assert server.stats.abandoned_received == pair.c2s.too_big
    assert pair.client.stats.abandoned_received == pair.s2c.too_big
    assert not _lost(pair)
    assert server.receiver.stats.gap_skips == 0 and pair.client.receiver.stats.gap_skips == 0


def test_asymmetric_paths_each_side_finds_its_own() -> None:
    pair = _pair(c2s_mtu=1400, s2c_mtu=9000 - 28)
    pair.transfer(_data(200_000, 5), _data(1_000_000, 6), limit=120)
    pair.run_until(lambda: _settled(pair), pair.now + 30)
    server = _server(pair)
    assert pair.client.datagram_size == 1392  # 1420 - 28, the largest table size under 1400
    assert server.datagram_size == 9000 - 28
    assert not _lost(pair)


def test_a_lost_probe_is_abandoned_without_data_lost_even_with_data_behind_it() -> None:
    """The only probe dropped is the first one of the ceiling's size; stream data sent right
    after it waits behind its hole until the Abandoned message closes it."""
    pair = _pair()
    pair.handshake()
    original = pair.s2c.push
    dropped: list[float] = []

    def push(data: bytes, now: float) -> None:
        if len(data) == CEILING and not dropped:
            dropped.append(now)
            return
        original(data, now)

    pair.s2c.push = push  # type: ignore[method-assign]
    down = _data(400_000, 7)
    pair.transfer(b"", down, limit=30)
    pair.run_until(lambda: _settled(pair), pair.now + 30)
    server = _server(pair)
    assert dropped and pair.cpeer.received[1] == down
    assert server.pmtud is not None and server.pmtud.stats.probes_lost == 1
    assert pair.client.stats.abandoned_received == 1
    assert not _lost(pair)
    assert server.datagram_size == CEILING  # the second probe of that size got through


def test_a_probe_refused_by_the_first_hop_fails_at_once() -> None:
    pair = _pair()
    pair.handshake()
    client = pair.client
    pm = client.pmtud
    assert pm is not None
    pair.run_until(lambda: client._probe_size == CEILING and client._probe_nonce >= 0, 5.0)
    client.datagram_refused(CEILING, pair.now)  # EMSGSIZE from the socket
    assert pm.stats.probes_lost == 1 and pm.probe_in_flight is None
    assert client.stats.probes_abandoned == 1
    pair.run_until(lambda: pm.state is PmtudState.SEARCH_COMPLETE, 10.0)
    assert client.datagram_size < CEILING  # searched the table below the refused size


def test_a_black_hole_falls_back_to_the_base_and_the_connection_carries_on() -> None:
    """The path shrinks to 1472 bytes after the server climbed to 65507: datagrams already
    sent that large can never arrive (their bytes are bound to their nonces), so the client
    reports them lost (DataLost, the streams reset) instead of waiting for ever; the server
    falls back to the base size, searches again and new data flows."""
    pair = _pair()
    pair.handshake()
    pair.run_until(lambda: _settled(pair), 5.0)
    down = _data(600_000, 8)
    pair.transfer(b"", down, limit=30)
    server = _server(pair)
    assert server.datagram_size == CEILING
    pair.s2c.mtu = V4_1500
    server.send_data(3, _data(2_000_000, 9))
    pm = server.pmtud
    assert pm is not None
    pair.run_until(lambda: pm.stats.black_holes >= 1, pair.now + 30)
    assert pm.stats.black_holes == 1
    assert server.datagram_size <= V4_1500
    pair.run_until(lambda: pm.state is PmtudState.SEARCH_COMPLETE, pair.now + 30)
    assert server.datagram_size == V4_1500
    # new data after the fallback arrives
    marker = _data(100_000, 10)
    server.send_data(5, marker)
    pair.run_until(lambda: len(pair.cpeer.received[5]) >= len(marker), pair.now + 30)
    assert bytes(pair.cpeer.received[5]) == marker


def test_without_the_extension_no_abandoned_message_is_sent() -> None:
    """An ostp-py peer with extensions off is an upstream peer as far as the wire goes: it is
    never sent tag 0x41 (its relay decoder would count it as unknown)."""
    pair = _pair(c2s_mtu=V4_1500, s2c_mtu=V4_1500, extensions=False)
    pair.handshake()
    pair.run_until(
        lambda: (
            pair.client.pmtud is not None and pair.client.pmtud.state is PmtudState.SEARCH_COMPLETE
        ),
        20.0,
    )
    server = _server(pair)
    assert pair.client.pmtud is not None and pair.client.pmtud.stats.probes_lost >= 3
    assert pair.client.stats.probes_abandoned == 0 and server.stats.probes_abandoned == 0
    assert server.stats.relay_decode_drop == 0 and pair.client.stats.relay_decode_drop == 0
    assert pair.client.datagram_size == V4_1500


def test_an_upstream_server_never_receives_tag_0x41_and_skips_the_probe_holes() -> None:
    mtu_rule = lambda _index, datagram: len(datagram) > V4_1500  # noqa: E731
    client_config, _ = _configs()
    world = World(client_config=client_config, c2s_drop=mtu_rule)  # upstream sends 4.2 KB
    world.handshake()
    record = world.connect(1, limit=10.0)
    world.get(1, 3_000_000)
    pm = world.client.pmtud
    world.run_until(
        lambda: (
            record.received >= 3_000_000
            and pm is not None
            and pm.state is PmtudState.SEARCH_COMPLETE
        ),
        world.now + 60,
    )
    assert record.received == 3_000_000 and not record.corrupt and record.reset_at is None
    assert pm is not None and pm.state is PmtudState.SEARCH_COMPLETE
    # one probe per size towards upstream: each lost one stalls its receiver for 500 ms
    assert world.client.datagram_size == V4_1500 and pm.stats.probes_lost == 2
    assert world.client.stats.probes_abandoned == 0
    assert world.server.stats.relay_decode_drops == 0
    world.run_for(1.5)
    session = next(iter(world.server.sessions.values()))
    assert session.machine.stats.gap_skips >= 1  # upstream stepped over the probes' holes
    assert session.machine.stats.skipped_nonces == pm.stats.probes_lost
    assert not world.lost


def test_probes_carry_no_stream_data_and_are_keepalive_frames() -> None:
    """What an upstream receiver sees of a probe: a KeepAlive frame (kind 4), padded."""
    pair = _pair()
    pair.handshake()
    probes: list[bytes] = []
    original = pair.c2s.push

    def push(data: bytes, now: float) -> None:
        if len(data) in (BASE_PLPMTU, CEILING):
            probes.append(data)
        original(data, now)

    pair.c2s.push = push  # type: ignore[method-assign]
    pair.run_until(lambda: len(probes) >= 2, 5.0)
    server = _server(pair)
    opener = server._opener
    assert opener is not None
    for probe in probes:
        nonce = unmask_data_header(server._secrets.obfuscation_key, probe)[1]
        plaintext = opener.decrypt(nonce, probe)
        assert plaintext is not None
        assert plaintext[1] == 4 and plaintext[6:8] == b"\x00\x00"  # KEEPALIVE, no payload
    assert KEY  # the harness key is what both sides derived their secrets from


def test_over_a_stream_transport_there_is_no_discovery() -> None:
    pair = _pair()
    pair.handshake()
    client = pair.client
    client.set_path_mtu(pair.now, None)
    assert client.pmtud is None and client.datagram_size == CEILING


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    c2s_mtu=st.integers(min_value=BASE_PLPMTU, max_value=20_000),
    s2c_mtu=st.integers(min_value=BASE_PLPMTU, max_value=20_000),
    seed=st.integers(min_value=0, max_value=1000),
    loss=st.sampled_from([0.0, 0.01]),
)
def test_any_path_mtu_gives_a_byte_exact_transfer_without_data_lost(
    c2s_mtu: int, s2c_mtu: int, seed: int, loss: float
) -> None:
    pair = _pair(c2s_mtu, s2c_mtu, seed=seed, c2s=Faults(loss=loss), s2c=Faults(loss=loss))
    up, down = _data(150_000, seed), _data(600_000, seed + 1)
    pair.transfer(up, down, limit=300)
    pair.run_until(lambda: _settled(pair), pair.now + 60)
    assert pair.speer.received[1] == up and pair.cpeer.received[1] == down
    assert not _lost(pair)
    server = _server(pair)
    assert BASE_PLPMTU <= pair.client.datagram_size <= c2s_mtu
    assert BASE_PLPMTU <= server.datagram_size <= s2c_mtu
