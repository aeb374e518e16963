"""Transport ``auto``'s policy (`outbounds/ostp/auto.py`) on its own: times and outcomes in,
decisions out, no sockets. The end-to-end behaviour (a real UDP path that stops and starts
passing) is test_transport_auto.py's."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ostp_client.outbounds.ostp.auto import AutoStep, AutoTransport
from ostp_client.outbounds.ostp.options import PROBE_BACKOFF, TransportMode

UDP_TIMEOUT = 3.0
KEEPALIVE = 5.0
PROBE = 30.0


def _auto(fallback: TransportMode = TransportMode.TCP) -> AutoTransport:
    return AutoTransport(
        fallback=fallback,
        udp_timeout=UDP_TIMEOUT,
        keepalive_interval=KEEPALIVE,
        probe_interval=PROBE,
    )


def _deadline(auto: AutoTransport) -> float | None:
    return auto.deadline  # read anew each time (mypy would keep an earlier narrowing)


def _step(
    auto: AutoTransport,
    now: float,
    *,
    reliable: bool = False,
    established: bool = False,
    progress: float = 0.0,
    probe_ready: bool = False,
) -> AutoStep:
    return auto.step(
        now,
        reliable=reliable,
        established=established,
        progress=progress,
        probe_ready=probe_ready,
    )


def test_a_udp_handshake_gets_udp_timeout_then_the_next_attempt_is_tcp() -> None:
    auto = _auto(TransportMode.WSS)
    assert auto.first_transport() == TransportMode.UDP
    auto.new_attempt(100.0)
    assert _step(auto, 100.0) is AutoStep.STAY
    assert _deadline(auto) == 100.0 + UDP_TIMEOUT  # the session wakes up for the verdict
    assert _step(auto, 102.9) is AutoStep.STAY
    assert _step(auto, 103.0) is AutoStep.END_ATTEMPT
    assert _deadline(auto) is None
    assert auto.first_transport() == TransportMode.WSS  # the fallback configured
    auto.tcp_ended()  # that TCP session ended (or TCP failed to connect)
    assert auto.first_transport() == TransportMode.UDP


def test_a_live_udp_session_falls_back_after_two_silent_keepalive_intervals() -> None:
    auto = _auto()
    auto.new_attempt(0.0)
    # progress: the later of the last datagram received and the last acknowledgement
    assert _step(auto, 12.0, established=True, progress=3.0) is AutoStep.STAY
    assert _deadline(auto) == 3.0 + 2 * KEEPALIVE
    assert _step(auto, 13.0, established=True, progress=3.0) is AutoStep.FALL_BACK
    assert auto.first_transport() == TransportMode.UDP  # nothing decided until it moved
    auto.fell_back()
    assert auto.first_transport() == TransportMode.TCP


def test_tcp_failing_too_puts_the_next_fallback_a_keepalive_interval_off() -> None:
    auto = _auto()
    assert _step(auto, 20.0, established=True, progress=0.0) is AutoStep.FALL_BACK
    auto.fallback_failed(21.0)
    assert _step(auto, 25.0, established=True, progress=0.0) is AutoStep.STAY
    assert _deadline(auto) == 21.0 + KEEPALIVE
    assert auto.first_transport() == TransportMode.UDP
    assert _step(auto, 26.0, established=True, progress=0.0) is AutoStep.FALL_BACK


def test_on_tcp_one_probe_runs_at_a_time_and_only_for_a_live_session() -> None:
    auto = _auto()
    assert _step(auto, 0.0, reliable=True, established=False) is AutoStep.STAY
    assert _step(auto, 0.0, reliable=True, established=True) is AutoStep.PROBE
    assert auto.probing
    for now in (1.0, 100.0, 1000.0):
        assert _step(auto, now, reliable=True, established=True) is AutoStep.STAY
        assert _deadline(auto) is None  # the probe's task wakes the session, not a timer
    auto.probe_ended()
    assert _step(auto, 1001.0, reliable=True, established=True) is AutoStep.PROBE


def test_a_completed_probe_moves_a_live_session_back_to_udp() -> None:
    auto = _auto()
    auto.fell_back()
    assert auto.first_transport() == TransportMode.TCP
    ready = _step(auto, 0.0, reliable=True, established=True, probe_ready=True)
    assert ready is AutoStep.MOVE_TO_UDP
    assert auto.first_transport() == TransportMode.UDP


def test_a_completed_probe_is_dropped_when_the_session_is_not_live() -> None:
    auto = _auto()
    auto.fell_back()
    ready = _step(auto, 0.0, reliable=True, established=False, probe_ready=True)
    assert ready is AutoStep.DROP_PROBE
    assert auto.first_transport() == TransportMode.TCP


def test_probe_interval_doubles_while_probes_fail_up_to_its_cap() -> None:
    auto = _auto()
    assert auto.probe_interval == PROBE
    waits = [auto.probe_failed() for _ in range(6)]
    assert waits == [60.0, 120.0, 240.0, 240.0, 240.0, 240.0]
    assert PROBE_BACKOFF * PROBE == 240.0
    auto.probe_succeeded()
    assert auto.probe_interval == PROBE


times = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
intervals = st.floats(min_value=0.5, max_value=3600.0, allow_nan=False)


@given(
    attempt=times,
    elapsed=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    established=st.booleans(),
    silent=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    fallback_failed_ago=st.none() | st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    udp_timeout=intervals,
    keepalive=intervals,
)
def test_on_udp_a_stay_wakes_up_exactly_when_the_verdict_changes(
    attempt: float,
    elapsed: float,
    established: bool,
    silent: float,
    fallback_failed_ago: float | None,
    udp_timeout: float,
    keepalive: float,
) -> None:
    """On UDP the session sleeps until ``deadline`` at most: the deadline is in the future,
    and at that time (with nothing new heard) the verdict is no longer STAY."""

    def make() -> AutoTransport:
        auto = AutoTransport(
            fallback=TransportMode.TCP,
            udp_timeout=udp_timeout,
            keepalive_interval=keepalive,
            probe_interval=PROBE,
        )
        auto.new_attempt(attempt)
        if fallback_failed_ago is not None:
            auto.fallback_failed(now - fallback_failed_ago)
        return auto

    now = attempt + elapsed
    progress = now - silent
    auto = make()
    step = _step(auto, now, established=established, progress=progress)
    expected = AutoStep.FALL_BACK if established else AutoStep.END_ATTEMPT
    if step is AutoStep.STAY:
        deadline = _deadline(auto)
        assert deadline is not None and deadline > now
        later = make()
        assert _step(later, deadline, established=established, progress=progress) is expected
    else:
        assert step is expected
        assert _deadline(auto) is None
        if established:  # the silence is long enough and no failed fallback holds it back
            assert now >= progress + 2 * keepalive
        else:
            assert now >= attempt + udp_timeout
            assert auto.first_transport() == TransportMode.TCP


class AutoSession(RuleBasedStateMachine):
    """A session driven through random outcomes: its attempts, handshakes, silences, probes
    that complete, fail or are cancelled, TCP that fails, all on a clock that only advances."""

    def __init__(self) -> None:
        super().__init__()
        self.auto = _auto()
        self.now = 0.0
        self.reliable = False
        self.established = False
        self.heard = 0.0
        self.probe_running = False
        self.probe_ready = False
        self.auto.new_attempt(self.now)

    @rule(dt=st.floats(min_value=0.0, max_value=600.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def hear_the_server(self) -> None:
        self.heard = self.now

    @rule()
    def handshake_completes(self) -> None:
        self.established = True
        self.heard = self.now

    @rule()
    def session_ends(self) -> None:
        if self.reliable:
            self.auto.tcp_ended()
        if self.probe_running:  # cancelled with its attempt
            self.auto.probe_ended()
            self.probe_running = False
        self.probe_ready = False
        self.reliable = self.auto.first_transport() != TransportMode.UDP
        self.established = False
        self.auto.new_attempt(self.now)

    @precondition(lambda self: self.probe_running)
    @rule(completed=st.booleans())
    def probe_finishes(self, completed: bool) -> None:
        if completed:
            self.auto.probe_succeeded()
            self.probe_ready = True
        else:
            self.auto.probe_failed()
        self.auto.probe_ended()
        self.probe_running = False

    @rule(tcp_works=st.booleans())
    def step(self, tcp_works: bool) -> None:
        probing_before = self.auto.probing
        step = _step(
            self.auto,
            self.now,
            reliable=self.reliable,
            established=self.established,
            progress=self.heard,
            probe_ready=self.probe_ready,
        )
        if step is AutoStep.STAY:
            deadline = _deadline(self.auto)
            assert deadline is None or deadline > self.now
        else:
            assert _deadline(self.auto) is None
        if step is AutoStep.PROBE:
            assert not probing_before and not self.probe_running  # never two probes at once
            assert self.reliable and self.established
            self.probe_running = True
        elif step is AutoStep.MOVE_TO_UDP:
            assert self.reliable and self.established and self.probe_ready
            self.probe_ready = False
            self.reliable = False
            assert self.auto.first_transport() == TransportMode.UDP
        elif step is AutoStep.DROP_PROBE:
            assert self.reliable and not self.established and self.probe_ready
            self.probe_ready = False
        elif step is AutoStep.END_ATTEMPT:
            assert not self.reliable and not self.established
            assert self.auto.first_transport() == TransportMode.TCP
            self.session_ends()
        elif step is AutoStep.FALL_BACK:
            assert not self.reliable and self.established
            assert self.now - self.heard >= 2 * KEEPALIVE
            if tcp_works:
                self.auto.fell_back()
                self.reliable = True
            else:
                self.auto.fallback_failed(self.now)

    @invariant()
    def probe_interval_stays_within_its_bounds(self) -> None:
        assert PROBE <= self.auto.probe_interval <= PROBE_BACKOFF * PROBE
        assert math.isfinite(self.auto.probe_interval)

    @invariant()
    def probing_is_what_the_session_runs(self) -> None:
        assert self.auto.probing == self.probe_running


TestAutoSession = AutoSession.TestCase
