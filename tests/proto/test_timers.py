"""No busy deadlines: a shell that runs a core's due timers at a frozen ``now`` must get quiet.

A shell sleeps until ``get_timer()``, then calls ``handle_timer(now)`` and sends what
``datagrams_to_send(now)`` returns. If the core then reports a deadline that is not later than
``now`` although it sent nothing and changed nothing, the shell spins on the same deadline for
ever (issue item 9: the server froze in its timer loop because ``pacing_deadline()`` ignored
the in-flight span that ``window_open()`` checks). These tests drive real cores over a lossy
in-memory link, including a peer that never acknowledges one datagram, so the span fills up
while the congestion window still has room, and check the shell's view after every step.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_proto import Connection, ConnectionConfig, PaddingPolicy, State
from ostp_proto.connection import SERVER_DEFAULTS

from .harness import Faults, Link, Pair

FULL_DATAGRAM = 1350  # stream data fills 1,400-byte datagrams; control ones stay below 1,300
QUIET_ROUNDS = 10_000


@dataclass
class VictimLink(Link):
    """A link that loses every copy of its ``victim_index``-th full data datagram.

    Retransmissions carry the same bytes, so the receiver never gets that nonce: the sender's
    oldest unacknowledged datagram stays while everything after it is acknowledged.
    """

    victim_index: int = 0
    armed: bool = False
    victim: bytes | None = None
    full_seen: int = 0
    victim_drops: int = 0

    def push(self, data: bytes, now: float) -> None:
        if self.armed and self.victim is None and self.victim_index and len(data) >= FULL_DATAGRAM:
            self.full_seen += 1
            if self.full_seen == self.victim_index:
                self.victim = data
        if data == self.victim:
            self.sent += 1
            self.victim_drops += 1
            return
        super().push(data, now)


def settle(conn: Connection, link: Link, now: float, drain: object) -> None:
    """Run ``conn``'s due timers at a frozen ``now`` as a shell does; fail on a busy deadline."""
    assert callable(drain)
    for _ in range(QUIET_ROUNDS):
        deadline = conn.get_timer()
        if deadline is None or deadline > now:
            return
        events_before = len(conn._events)
        state_before = conn.state
        conn.handle_timer(now)
        out = conn.datagrams_to_send(now)
        progress = bool(out) or len(conn._events) != events_before or conn.state != state_before
        for d in out:
            link.push(d, now)
        drain()
        if not progress:
            after = conn.get_timer()
            assert after is None or after > now, (
                f"busy deadline: get_timer() = {after} <= now = {now} and nothing was sent "
                f"(in flight {conn.sender.bytes_in_flight} of cwnd {conn.sender.cc.cwnd}, "
                f"span {conn.sender.next_nonce - conn.sender._oldest()} "
                f"of {conn.sender.max_in_flight})"
            )
    raise AssertionError(f"still due after {QUIET_ROUNDS} rounds at now = {now}")


class CheckedPair(Pair):
    """A :class:`Pair` whose every step first lets each core get quiet at the current time."""

    def step(self) -> bool:
        self._flush()
        settle(self.client, self.c2s, self.now, lambda: self._drain(self.client, self.cpeer))
        if self.server is not None:
            server = self.server
            settle(server, self.s2c, self.now, lambda: self._drain(server, self.speer))
        return super().step()


def _pair(
    *,
    seed: int,
    max_in_flight: int,
    victim_down: int,
    victim_up: int,
    c2s: Faults | None = None,
    s2c: Faults | None = None,
    latency: float = 0.01,
) -> CheckedPair:
    client_config = ConnectionConfig(
        padding=PaddingPolicy.none(),
        handshake_attempts=1000,
        max_in_flight=max_in_flight,
        gap_skip_after=60.0,
    )
    server_config = dataclasses.replace(
        SERVER_DEFAULTS, max_in_flight=max_in_flight, gap_skip_after=60.0
    )
    pair = CheckedPair(
        seed=seed,
        c2s=c2s,
        s2c=s2c,
        client_config=client_config,
        server_config=server_config,
        latency=latency,
    )
    pair.s2c = VictimLink(
        s2c or Faults(), random.Random(seed + 2), latency, victim_index=victim_down
    )
    pair.c2s = VictimLink(c2s or Faults(), random.Random(seed + 1), latency, victim_index=victim_up)
    return pair


def _run_transfer(pair: CheckedPair, up: int, down: int, limit: float) -> None:
    pair.handshake(limit=60.0)
    server = pair.server
    assert server is not None
    for link in (pair.c2s, pair.s2c):
        assert isinstance(link, VictimLink)
        link.armed = True
    rng = random.Random(7)
    up_data, down_data = rng.randbytes(up), rng.randbytes(down)
    offsets = [0, 0]

    def done() -> bool:
        while offsets[0] < len(up_data) and pair.client.writable:
            pair.client.send_data(1, up_data[offsets[0] : offsets[0] + 65536])
            offsets[0] += 65536
        while offsets[1] < len(down_data) and server.writable:
            server.send_data(1, down_data[offsets[1] : offsets[1] + 65536])
            offsets[1] += 65536
        return bool(pair.cpeer.terminated or pair.speer.terminated)

    pair.run_until(done, pair.now + limit)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_in_flight", [16, 256])
def test_span_limit_with_an_open_window_is_not_a_busy_deadline(max_in_flight: int) -> None:
    """The server's oldest datagram never arrives; the client acknowledges all the rest."""
    pair = _pair(seed=3, max_in_flight=max_in_flight, victim_down=3, victim_up=0)
    _run_transfer(pair, up=0, down=4 * max_in_flight * 1400, limit=3.0)
    server = pair.server
    assert server is not None and server.state is State.ESTABLISHED
    assert isinstance(pair.s2c, VictimLink) and pair.s2c.victim_drops > 1
    sender = server.sender
    # the situation of the freeze: the span is full while the window has room
    assert sender.next_nonce - sender._oldest() >= max_in_flight
    assert sender.bytes_in_flight < sender.cc.cwnd


fault_rates = st.builds(
    Faults,
    loss=st.sampled_from([0.0, 0.02, 0.2]),
    duplicate=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.2]),
    corrupt=st.sampled_from([0.0, 0.05]),
)


@pytest.mark.timeout(300)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    max_in_flight=st.sampled_from([4, 16, 64, 1024]),
    victim_down=st.integers(0, 6),
    victim_up=st.integers(0, 6),
    c2s=fault_rates,
    s2c=fault_rates,
    up=st.integers(0, 300_000),
    down=st.integers(0, 300_000),
    latency=st.sampled_from([0.001, 0.02]),
)
def test_no_busy_deadline_under_any_fault_schedule(
    seed: int,
    max_in_flight: int,
    victim_down: int,
    victim_up: int,
    c2s: Faults,
    s2c: Faults,
    up: int,
    down: int,
    latency: float,
) -> None:
    pair = _pair(
        seed=seed,
        max_in_flight=max_in_flight,
        victim_down=victim_down,
        victim_up=victim_up,
        c2s=c2s,
        s2c=s2c,
        latency=latency,
    )
    _run_transfer(pair, up=up, down=down, limit=4.0)
