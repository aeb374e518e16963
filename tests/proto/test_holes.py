"""The receiver's holes under any arrival schedule (properties, spec §7.3 and our timing).

A driver plays the connection's part (classify, then accept or record a sighting, NACK
rounds, expiry on the timer) over random arrivals with losses, duplicates, reordering, small
windows and buffers, and our own drops (receive pause). It checks that holes describe exactly
what is missing, that a hole is never given up sooner than the bound after the first datagram
past it arrived, that none outlives it, that frames are delivered once and in order, and that
every missing nonce is NACKed, never twice within NACK_REPEAT.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto.arq import HOLE_MERGE, NACK_BURST, NACK_PACE, NACK_REPEAT, Receiver, decode_nack
from ostp_proto.frames import FrameKind

BOUND = 1.0  # the owner's bound (gap_skip_after + RTT) in these runs


@dataclass
class Run:
    receiver: Receiver
    arrivals: dict[int, float] = field(default_factory=dict)  # first arrival of each nonce
    accepted: set[int] = field(default_factory=set)
    delivered: list[int] = field(default_factory=list)
    expired: set[int] = field(default_factory=set)
    nacked: dict[int, list[float]] = field(default_factory=dict)
    missing_since: dict[int, float] = field(default_factory=dict)

    def true_born(self, nonce: int) -> float:
        """When the first datagram past ``nonce`` (or ``nonce`` itself) arrived: the peer
        had sent ``nonce`` by then."""
        return min(t for n, t in self.arrivals.items() if n >= nonce)

    def arrive(self, nonce: int, now: float) -> None:
        r = self.receiver
        self.arrivals.setdefault(nonce, now)
        verdict = r.classify(nonce, now)
        if verdict == 1:
            return
        if verdict == 2:
            r.sighted(nonce, now)
            return
        full = r.stats.reorder_buffer_drop
        out = r.accept(nonce, (FrameKind.DATA, 1, nonce.to_bytes(4, "big"), 4), True, now)
        if r.stats.reorder_buffer_drop == full:  # else dropped for room: missing after all
            self.accepted.add(nonce)
        self.delivered += [int.from_bytes(p, "big") for _k, _s, p, _e in out]

    def timer(self, now: float) -> None:
        r = self.receiver
        for first, last, frames in r.expire_holes(now, BOUND):
            # safety: never sooner than the bound after the first datagram past it
            assert now >= self.true_born(last) + BOUND - 1e-9
            assert now >= r.own_drop_at + BOUND - 1e-9
            self.expired.update(range(first, last + 1))
            self.delivered += [int.from_bytes(p, "big") for _k, _s, p, _e in frames]
        deadline = r.nack_deadline()
        if deadline is not None and now >= deadline:
            for payload in r.build_nacks(now):
                nonce = decode_nack(payload)
                # only what is missing, and never again within NACK_REPEAT
                assert r.expected <= nonce <= r.highest and nonce not in r.buffer
                times = self.nacked.setdefault(nonce, [])
                assert not times or now - times[-1] >= NACK_REPEAT - 1e-9
                times.append(now)

    def check(self, now: float) -> None:
        r = self.receiver
        holes = r.holes
        covered: set[int] = set()
        for h, nxt in itertools.pairwise(holes):
            assert h.end < nxt.start and h.born <= nxt.born
        for h in holes:
            assert h.start <= h.end
            covered.update(range(h.start, h.end + 1))
        span = set(range(r.expected, r.highest + 1))
        assert covered == span - set(r.buffer)
        assert not covered & set(r.buffer)
        assert r.expected == (holes[0].start if holes else r.highest + 1)
        for h in holes:
            # liveness: nothing overdue is left once the timer ran
            assert now < max(self.true_born(h.start) + HOLE_MERGE, r.own_drop_at) + BOUND + 1e-9
        for nonce in covered:
            self.missing_since.setdefault(nonce, now)
        for nonce in list(self.missing_since):
            if nonce not in covered:
                del self.missing_since[nonce]
        # every nonce missing for a while has been asked for
        waited = r.nack_delay + (len(covered) // NACK_BURST + 2) * NACK_PACE + 0.05
        for nonce, since in self.missing_since.items():
            if now - since > waited and r.own_drop_at < since:
                assert nonce in self.nacked, (nonce, since, now)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, float]]]:
    """(window, buffer, events): arrivals of nonces (some never, some twice, out of order),
    timer runs and own drops, each after a random pause."""
    window = draw(st.integers(4, 40))
    buffer = draw(st.integers(2, 30))
    n = draw(st.integers(1, 120))
    lost = draw(st.sets(st.integers(0, n - 1), max_size=n // 2))
    order = [i for i in range(n) if i not in lost]
    # local reordering: swap some neighbours
    for i in draw(st.lists(st.integers(0, max(n - 2, 0)), max_size=n // 3)):
        if i + 1 < len(order):
            order[i], order[i + 1] = order[i + 1], order[i]
    events: list[tuple[str, int, float]] = []
    for nonce in order:
        events.append(("arrive", nonce, draw(st.sampled_from([0.0, 0.001, 0.01, 0.2]))))
        extra = draw(st.sampled_from(["none", "none", "dup", "timer", "own-drop", "late"]))
        if extra == "dup":
            events.append(("arrive", nonce, 0.0))
        elif extra == "timer":
            events.append(("timer", 0, draw(st.sampled_from([0.1, 0.5, 1.2]))))
        elif extra == "own-drop":
            events.append(("own-drop", 0, 0.0))
        elif extra == "late" and lost:  # a lost one turns up after all
            events.append(("arrive", draw(st.sampled_from(sorted(lost))), 0.05))
    events.append(("timer", 0, 3.0))
    return window, buffer, events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.sampled_from([0.0, 0.02]))
def test_holes_track_exactly_what_is_missing_and_expire_on_time(
    schedule: tuple[int, int, list[tuple[str, int, float]]], nack_delay: float
) -> None:
    window, buffer, events = schedule
    run = Run(Receiver(ack_delay=0.005, ack_frequency=32, max_reorder=window, max_buffer=buffer))
    run.receiver.nack_delay = nack_delay
    now = 0.0
    for kind, nonce, pause in events:
        # the timer fires at every deadline on the way, as a shell does
        end = now + pause
        for _ in range(10_000):
            r = run.receiver
            due = [
                t
                for t in (r.hole_deadline(BOUND), r.nack_deadline())
                if t is not None and now <= t <= end
            ]
            if not due:
                break
            now = max(now, min(due))
            run.timer(now)
            run.check(now)
        else:
            raise AssertionError("a deadline that never passes")
        now = end
        if kind == "arrive":
            run.arrive(nonce, now)
        elif kind == "own-drop":
            run.receiver.own_drop_at = now
        run.timer(now)
        run.check(now)
    r = run.receiver
    # every frame taken is delivered exactly once and in order; given-up nonces never are
    assert run.delivered == sorted(run.delivered)
    assert len(run.delivered) == len(set(run.delivered))
    assert set(run.delivered) <= run.accepted
    assert not set(run.delivered) & run.expired
    assert set(run.delivered) == {n for n in run.accepted if n < r.expected}
    assert not r.holes and not r.buffer  # all given up or filled by the end
