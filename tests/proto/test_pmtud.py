"""DPLPMTUD (ostp_proto.pmtud) against simulated paths on a virtual clock.

The simulated sender does what the connection will do: it asks for probes, sends data datagrams
of the current ``max_datagram_size`` (and small control datagrams) at a steady rate, and reports
acknowledgements one RTT later and losses when the ACK-based loss detection would see them. The
path drops datagrams above its limit (optionally answering with Packet Too Big), refuses
datagrams above the first hop's MTU at once (``EMSGSIZE``), and can change its limit, drop
everything above a size (a black hole) or lose datagrams at random.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_proto.errors import LocalProtocolError
from ostp_proto.pmtud import (
    BASE_PLPMTU,
    COMMON_LINK_MTUS,
    IPV4_UDP_OVERHEAD,
    IPV6_UDP_OVERHEAD,
    MAX_UDP_PAYLOAD,
    MIN_PLPMTU,
    PathMtuDiscovery,
    PmtudConfig,
    PmtudState,
)

V4_1500 = 1500 - IPV4_UDP_OVERHEAD  # 1472
RTT = 0.02


@dataclass
class SimPath:
    """What the network does to a datagram of some size."""

    limit: int
    """Largest UDP payload that arrives."""
    first_hop: int | None = None
    """Largest UDP payload the sender's own interface takes (EMSGSIZE above it)."""
    ptb: bool = False
    """Answer oversized datagrams with a Packet Too Big naming ``limit``."""
    loss: float = 0.0
    """Random loss of any datagram."""
    down: bool = False
    """Everything is lost."""


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class Sim:
    """A sender with one PathMtuDiscovery over a SimPath, on a virtual clock."""

    def __init__(self, path: SimPath, config: PmtudConfig | None = None, *, seed: int = 0) -> None:
        self.path = path
        self.pm = PathMtuDiscovery(config)
        self.now = 0.0
        self.rng = random.Random(seed)
        self._queue: list[_Due] = []
        self._seq = 0
        self.data_sizes: list[tuple[float, int, int]] = []  # (time, size, path limit then)
        self.probes: list[tuple[float, int]] = []
        self.probes_lost_on_path = 0
        self.data_interval = RTT / 2

    def _at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Due(when, self._seq, action))

    def _arrives(self, size: int) -> bool:
        p = self.path
        return not p.down and size <= p.limit and self.rng.random() >= p.loss

    def _send_probe(self, size: int) -> None:
        pm, now = self.pm, self.now
        self.probes.append((now, size))
        first_hop = self.path.first_hop
        if first_hop is not None and size > first_hop:
            pm.on_packet_too_big(first_hop, now)  # EMSGSIZE from send(): never left the host
            return
        if self._arrives(size):
            self._at(now + RTT, lambda: pm.on_probe_acked(size, self.now))
            return
        self.probes_lost_on_path += 1
        if self.path.ptb and size > self.path.limit and not self.path.down:
            limit = self.path.limit
            self._at(now + RTT / 2, lambda: pm.on_packet_too_big(limit, self.now))
        # ACK-based loss detection: later datagrams are acknowledged past it
        self._at(now + RTT * 1.2, lambda: pm.on_probe_lost(size, self.now))

    def _send_data(self) -> None:
        pm, now = self.pm, self.now
        for size in (pm.max_datagram_size, 80):  # a full data datagram and a small control one
            if size > 80:
                self.data_sizes.append((now, size, self.path.limit))
            if self._arrives(size):
                self._at(now + RTT, partial(self._report, pm.on_datagram_acked, size, now))
            else:
                self._at(now + RTT * 1.2, partial(self._report, pm.on_datagram_lost, size, now))
        self._at(now + self.data_interval, self._send_data)

    def _report(self, method: Callable[[int, float, float], None], size: int, sent: float) -> None:
        method(size, sent, self.now)

    def run(self, until: float, *, data: bool = True) -> None:
        if data and not any(d.action == self._send_data for d in self._queue):
            self._at(self.now, self._send_data)
        while True:
            size = self.pm.probe_size_to_send(self.now)
            if size is not None:
                self._send_probe(size)
                continue
            timer = self.pm.get_timer()
            nxt = self._queue[0].at if self._queue else None
            if timer is not None and (nxt is None or timer <= nxt):
                if timer > until:
                    break
                self.now = max(self.now, timer)
                self.pm.handle_timer(self.now)
                continue
            if nxt is None or nxt > until:
                break
            due = heapq.heappop(self._queue)
            self.now = max(self.now, due.at)
            due.action()
        self.now = until

    def oversized_data_after(self, t: float) -> list[tuple[float, int, int]]:
        return [d for d in self.data_sizes if d[0] >= t and d[1] > d[2]]


def state(pm: PathMtuDiscovery) -> PmtudState:
    """The state, read through a call so that mypy does not narrow it between reads."""
    return pm.state


def candidates(overhead: int, top: int) -> list[int]:
    sizes = {m - overhead for m in COMMON_LINK_MTUS} | {top, BASE_PLPMTU}
    return sorted(s for s in sizes if BASE_PLPMTU <= s <= top)


# ----------------------------------------------------------------------------- convergence


def test_loopback_climbs_to_the_largest_datagram_in_two_round_trips() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD))
    sim.run(3 * RTT)
    assert sim.pm.max_datagram_size == MAX_UDP_PAYLOAD
    assert sim.pm.state is PmtudState.SEARCH_COMPLETE
    assert [s for _, s in sim.probes] == [BASE_PLPMTU, MAX_UDP_PAYLOAD]
    assert sim.probes_lost_on_path == 0


def test_configured_ceiling_is_reached_and_never_passed() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=4200))
    sim.run(1.0)
    assert sim.pm.max_datagram_size == 4200
    assert max(s for _, s in sim.probes) == 4200
    assert max(s for _, s, _ in sim.data_sizes) == 4200


def test_first_hop_hint_means_no_probe_is_lost_on_a_1500_path() -> None:
    sim = Sim(SimPath(limit=V4_1500), PmtudConfig(max_plpmtu=V4_1500))
    sim.run(1.0)
    assert sim.pm.max_datagram_size == V4_1500
    assert sim.probes_lost_on_path == 0


def test_emsgsize_from_the_first_hop_leads_straight_to_its_mtu() -> None:
    sim = Sim(SimPath(limit=V4_1500, first_hop=V4_1500))
    sim.run(1.0)
    assert sim.pm.max_datagram_size == V4_1500
    assert sim.probes_lost_on_path == 0
    assert sim.pm.stats.ptb_received == 1


def test_silent_1500_path_behind_a_wide_first_hop_converges_below_1473() -> None:
    """No ICMP, no hint: the optimistic probe and then the table, two sizes fail at most."""
    sim = Sim(SimPath(limit=V4_1500))
    sim.run(10.0)
    assert sim.pm.max_datagram_size == V4_1500
    assert sim.pm.state is PmtudState.SEARCH_COMPLETE
    assert sim.probes_lost_on_path <= 2 * sim.pm.config.max_probes
    assert not sim.oversized_data_after(0.0)


def test_ptb_names_the_size_to_probe_next() -> None:
    sim = Sim(SimPath(limit=1400, ptb=True))
    sim.run(2.0)
    assert sim.pm.max_datagram_size == 1400  # exactly, though 1400 is in no table
    assert sim.probes_lost_on_path == 1
    assert not sim.oversized_data_after(0.0)


def test_ipv6_path_of_1500_stays_at_1452() -> None:
    config = PmtudConfig(ip_overhead=IPV6_UDP_OVERHEAD)
    sim = Sim(SimPath(limit=1500 - IPV6_UDP_OVERHEAD), config)
    sim.run(10.0)
    assert sim.pm.max_datagram_size == 1452


# ------------------------------------------------------------------------- changes, errors


def test_mtu_drop_mid_transfer_is_detected_and_recovered() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=9000))
    sim.run(1.0)
    assert sim.pm.max_datagram_size == 9000
    sim.path.limit = V4_1500  # a route change: silent drops above 1472 from now on
    changed = sim.now
    sim.run(changed + 5.0)
    assert sim.pm.stats.black_holes == 1
    assert sim.pm.max_datagram_size == V4_1500
    recovered = max(t for t, size, _ in sim.data_sizes if size > V4_1500)
    assert recovered - changed < 1.0
    assert not sim.oversized_data_after(recovered + 1e-9)


def test_black_hole_of_large_datagrams_falls_back_to_base_and_searches_below() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=V4_1500))
    sim.run(1.0)
    sim.path.limit = 1300  # e.g. a tunnel appeared on the path
    sim.run(sim.now + 10.0)
    assert sim.pm.stats.black_holes == 1
    # the largest table size under 1300 (the IPv6 minimum MTU), probed below the failed 1472
    assert sim.pm.max_datagram_size == 1280 - IPV4_UDP_OVERHEAD


def test_a_dead_path_is_not_a_black_hole() -> None:
    """Small datagrams do not get through either: that is the idle timeout's business."""
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=9000))
    sim.run(1.0)
    sim.path.down = True
    sim.run(sim.now + 5.0)
    assert sim.pm.stats.black_holes == 0
    assert sim.pm.max_datagram_size == 9000


def test_random_loss_is_not_a_black_hole() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD, loss=0.05), PmtudConfig(max_plpmtu=9000), seed=3)
    sim.run(60.0)
    assert sim.pm.stats.black_holes == 0
    assert sim.pm.max_datagram_size == 9000


def test_a_burst_lost_before_a_later_arrival_is_not_a_black_hole() -> None:
    """Loss detection declares a congestion burst lost on the ACK of a later datagram."""
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=9000))
    sim.run(1.0)
    pm, now = sim.pm, sim.now
    pm.on_datagram_acked(80, now - 0.01, now)
    pm.on_datagram_acked(9000, now - 0.01, now)
    for i in range(20):
        pm.on_datagram_lost(9000, now - 0.05 + i * 0.001, now)
        pm.on_datagram_acked(80, now, now)
    assert pm.stats.black_holes == 0
    for i in range(pm.config.black_hole_threshold):  # but the same after the newest arrival
        pm.on_datagram_acked(80, now, now)
        pm.on_datagram_lost(9000, now - 0.005 + i * 0.001, now)
    assert pm.stats.black_holes == 1
    assert pm.max_datagram_size == BASE_PLPMTU


def test_raise_timer_finds_a_wider_path() -> None:
    config = PmtudConfig(max_plpmtu=9000 - IPV4_UDP_OVERHEAD)
    sim = Sim(SimPath(limit=V4_1500), config)
    sim.run(5.0)
    assert sim.pm.max_datagram_size == V4_1500
    sim.path.limit = 9000 - IPV4_UDP_OVERHEAD
    sim.run(config.raise_interval - 1.0)
    assert sim.pm.max_datagram_size == V4_1500  # nothing probes before PMTU_RAISE_TIMER
    sim.run(config.raise_interval + 10.0)
    assert sim.pm.max_datagram_size == 9000 - IPV4_UDP_OVERHEAD


def test_raise_on_an_unchanged_path_costs_one_size() -> None:
    sim = Sim(SimPath(limit=V4_1500))
    sim.run(10.0)
    lost = sim.probes_lost_on_path
    sim.run(sim.pm.config.raise_interval + 20.0)
    assert sim.pm.max_datagram_size == V4_1500
    assert sim.probes_lost_on_path - lost == sim.pm.config.max_probes
    assert sim.pm.state is PmtudState.SEARCH_COMPLETE


def test_base_that_does_not_pass_is_the_error_state_until_the_path_heals() -> None:
    config = PmtudConfig(max_plpmtu=V4_1500)
    sim = Sim(SimPath(limit=1210), config)
    sim.run(2.0)
    assert sim.pm.state is PmtudState.ERROR
    assert sim.pm.max_datagram_size == MIN_PLPMTU
    assert not sim.oversized_data_after(0.5)  # the base is assumed until its probes fail
    sim.path.limit = V4_1500
    sim.run(config.error_retry_interval + 5.0)
    assert sim.pm.max_datagram_size == V4_1500


def test_ptb_below_the_current_size_validates_before_use() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(max_plpmtu=9000))
    sim.run(1.0)
    sim.pm.on_packet_too_big(1400, sim.now)
    assert sim.pm.max_datagram_size == BASE_PLPMTU  # never the unconfirmed 1400 at once
    sim.path.limit = 1400
    sim.run(sim.now + 2.0)
    assert sim.pm.max_datagram_size == 1400


def test_ptb_below_base_and_below_min() -> None:
    pm = PathMtuDiscovery()
    pm.on_packet_too_big(MIN_PLPMTU - 1, 0.0)  # below what any path must carry: ignored
    assert pm.stats.ptb_ignored == 1
    assert state(pm) is PmtudState.BASE
    pm.on_packet_too_big(MIN_PLPMTU + 10, 0.0)
    assert state(pm) is PmtudState.ERROR
    assert pm.max_datagram_size == MIN_PLPMTU


def test_disabled_sends_no_probe_and_keeps_the_base() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD), PmtudConfig(enabled=False))
    sim.run(5.0)
    assert sim.probes == []
    assert sim.pm.state is PmtudState.DISABLED
    assert sim.pm.max_datagram_size == BASE_PLPMTU


def test_path_change_starts_over_with_the_new_ceiling() -> None:
    sim = Sim(SimPath(limit=MAX_UDP_PAYLOAD))
    sim.run(1.0)
    assert sim.pm.max_datagram_size == MAX_UDP_PAYLOAD
    sim.pm.path_changed(sim.now, max_plpmtu=V4_1500)
    assert sim.pm.state is PmtudState.BASE
    assert sim.pm.max_datagram_size == BASE_PLPMTU
    sim.path.limit = V4_1500
    sim.run(sim.now + 1.0)
    assert sim.pm.max_datagram_size == V4_1500


def test_probe_timer_is_the_backstop_when_no_loss_is_reported() -> None:
    pm = PathMtuDiscovery(PmtudConfig(max_plpmtu=9000))
    assert pm.probe_size_to_send(0.0) == BASE_PLPMTU
    assert pm.probe_size_to_send(0.0) is None  # one probe at a time
    pm.on_probe_acked(BASE_PLPMTU, 0.02)
    now = 0.02
    for _ in range(pm.config.max_probes):
        assert pm.probe_size_to_send(now) == 9000
        timer = pm.get_timer()
        assert timer == now + pm.config.probe_timeout
        now = timer
        pm.handle_timer(now)
    assert pm.stats.probes_lost == pm.config.max_probes
    assert pm.probe_size_to_send(now) == 1252  # the table from the bottom: 1280 - 28


def test_late_and_stale_reports() -> None:
    pm = PathMtuDiscovery(PmtudConfig(max_plpmtu=9000))
    pm.on_probe_acked(BASE_PLPMTU, 0.0)  # an ACK for a probe never sent: it proves the base
    assert pm.state is PmtudState.SEARCHING
    assert pm.probe_size_to_send(0.0) == 9000
    pm.on_probe_lost(1400, 0.1)  # not the probe in flight
    assert pm.stats.stale_probe_reports == 1
    pm.on_probe_lost(9000, 0.1)
    pm.on_probe_acked(9000, 0.2)  # late: still proof that 9000 passes
    assert pm.max_datagram_size == 9000
    pm.on_probe_acked(1400, 0.3)
    assert pm.stats.stale_probe_reports == 2


def test_a_probe_acked_after_a_fallback_does_not_undo_it() -> None:
    pm = PathMtuDiscovery(PmtudConfig(max_plpmtu=9000))
    while (size := pm.probe_size_to_send(0.0)) is not None and size != 1452:
        if size == 9000:
            pm.on_probe_lost(size, 0.0)  # the optimistic ceiling fails
        else:
            pm.on_probe_acked(size, 0.0)  # the base, then the table up to 1422
    assert size == 1452
    assert pm.max_datagram_size == 1422
    pm.on_packet_too_big(1400, 0.01)  # the path narrowed while the probe was out
    assert state(pm) is PmtudState.BASE
    pm.on_probe_acked(1452, 0.02)  # it had passed before the change
    assert pm.max_datagram_size == BASE_PLPMTU
    assert state(pm) is PmtudState.BASE
    assert pm.stats.stale_probe_reports == 1


def test_bad_configuration_is_the_callers_error() -> None:
    with pytest.raises(LocalProtocolError):
        PmtudConfig(base_plpmtu=1000, min_plpmtu=1200)
    with pytest.raises(LocalProtocolError):
        PmtudConfig(max_plpmtu=70000)
    with pytest.raises(LocalProtocolError):
        PmtudConfig(max_probes=0)


# -------------------------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(BASE_PLPMTU, MAX_UDP_PAYLOAD),
    first_hop_slack=st.one_of(st.none(), st.integers(0, 60000)),
    ptb=st.booleans(),
    ipv6=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_path_converges_without_oversized_data(
    limit: int, first_hop_slack: int | None, ptb: bool, ipv6: bool, seed: int
) -> None:
    overhead = IPV6_UDP_OVERHEAD if ipv6 else IPV4_UDP_OVERHEAD
    first_hop = None if first_hop_slack is None else min(limit + first_hop_slack, MAX_UDP_PAYLOAD)
    sim = Sim(
        SimPath(limit=limit, first_hop=first_hop, ptb=ptb),
        PmtudConfig(ip_overhead=overhead),
        seed=seed,
    )
    sim.run(20.0)
    pm = sim.pm
    assert pm.state is PmtudState.SEARCH_COMPLETE
    # data never exceeds the path: sizes grow only on an acknowledged probe
    assert not sim.oversized_data_after(0.0)
    assert pm.max_datagram_size <= limit
    # and it gets as close as the probe sizes allow
    reachable = {limit} if (ptb or first_hop == limit) else set()
    best = max(s for s in {*candidates(overhead, MAX_UDP_PAYLOAD), *reachable} if s <= limit)
    assert pm.max_datagram_size >= best
    # lost probes stay bounded: the ceiling, one table size, at most one PTB-named size
    assert sim.probes_lost_on_path <= 3 * pm.config.max_probes


@settings(max_examples=40, deadline=None)
@given(
    first=st.integers(BASE_PLPMTU + 1, MAX_UDP_PAYLOAD),
    second=st.integers(BASE_PLPMTU, MAX_UDP_PAYLOAD),
    seed=st.integers(0, 2**16),
)
def test_any_change_of_the_path_is_followed(first: int, second: int, seed: int) -> None:
    """After a change either way, the size settles within the new limit again."""
    config = PmtudConfig(raise_interval=30.0)
    sim = Sim(SimPath(limit=first), config, seed=seed)
    sim.run(20.0)
    sim.path.limit = second
    sim.run(sim.now + config.raise_interval + 30.0)
    pm = sim.pm
    assert pm.max_datagram_size <= second
    settled = sim.now - 10.0
    assert not sim.oversized_data_after(settled)
    if second >= first:
        assert pm.max_datagram_size >= min(
            first, max(c for c in candidates(28, 65507) if c <= first)
        )
