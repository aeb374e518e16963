"""The NAT path's state and decisions (`outbounds/ostp/natpath.py`) on their own: direct or
TURN, falling back and trying direct again, what the STUN/TURN servers said. No sockets; the
sessions against a real coturn are test_nat_session.py's and test_nat_coturn.py's."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.nat import (
    AllocationSucceeded,
    BindingFailed,
    BindingSucceeded,
    RelayReady,
    TurnClosed,
    TurnConfig,
    TurnFailed,
    TurnFailure,
    TurnRefreshed,
)
from ostp_client.outbounds.ostp.natpath import EndAttempt, NatPath, StartHandshake, WarnOnce
from ostp_client.outbounds.ostp.options import NatMode, NatOptions

TURN = TurnConfig(server=("192.0.2.7", 3478), username="u", password="p")
RETRY = 600.0
STUN = ("192.0.2.9", 3478)


def _path(mode: NatMode, turn: TurnConfig | None = TURN) -> NatPath:
    nat = NatOptions(mode=mode, stun=(STUN,), turn=turn, retry_direct_after=RETRY)
    return NatPath(nat, "proxy session 0")


def _attempt(path: NatPath, now: float) -> bool:
    relay = path.choose(now)
    path.begin(relay)
    return relay


def _addresses(path: NatPath) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    return path.mapped_address, path.relayed_address  # read anew (no narrowing kept by mypy)


def test_without_nat_or_turn_every_attempt_is_direct() -> None:
    for path in (NatPath(None, "s"), _path(NatMode.AUTO, turn=None), _path(NatMode.DIRECT)):
        assert not _attempt(path, 0.0)
        assert not path.handshake_timed_out(1.0)  # no fallback without a relay to go to
        assert not _attempt(path, 2.0)


def test_mode_turn_always_relays() -> None:
    path = _path(NatMode.TURN)
    assert _attempt(path, 0.0) and path.path == "turn"
    assert not path.handshake_timed_out(1.0)  # no at-once retry: the usual back-off
    path.relay_failed()
    assert _attempt(path, 2.0)


def test_auto_falls_back_to_turn_at_once_and_back_to_direct_when_the_relay_fails_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _path(NatMode.AUTO)
    assert not _attempt(path, 0.0) and path.path == "direct"
    with caplog.at_level(logging.WARNING, "ostp_client.outbounds.ostp"):
        assert path.handshake_timed_out(10.0)  # retry now, through TURN
    assert "proxy session 0: no answer over direct UDP; falling back to TURN server " in (
        caplog.text
    )
    assert _attempt(path, 10.0) and path.path == "turn"
    assert not path.handshake_timed_out(20.0)  # no answer through the relay either
    assert not _attempt(path, 25.0)


def test_auto_tries_direct_again_retry_direct_after_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _path(NatMode.AUTO)
    _attempt(path, 0.0)
    assert path.handshake_timed_out(10.0)
    assert _attempt(path, 10.0)
    assert _attempt(path, 10.0 + RETRY - 1)  # a new attempt before that still relays
    with caplog.at_level(logging.INFO, "ostp_client.outbounds.ostp"):
        assert not _attempt(path, 10.0 + RETRY)
    assert "proxy session 0: 600 s on TURN; trying direct UDP again" in caplog.text


def test_auto_goes_direct_after_a_relay_failure() -> None:
    path = _path(NatMode.AUTO)
    _attempt(path, 0.0)
    path.handshake_timed_out(1.0)
    assert _attempt(path, 1.0)
    path.relay_failed()
    assert not _attempt(path, 2.0)


def test_events_fill_in_what_the_servers_said() -> None:
    path = _path(NatMode.TURN)
    _attempt(path, 0.0)
    mapped, other = ("203.0.113.1", 4000), ("203.0.113.2", 4001)
    relayed = ("192.0.2.7", 50000)
    assert path.on_event(BindingSucceeded(STUN, mapped)) is None
    assert path.on_event(BindingSucceeded(STUN, other)) is None
    assert path.mapped_address == mapped  # the first answer wins
    assert path.on_event(AllocationSucceeded(relayed, other, 600)) is None
    assert path.relayed_address == relayed and path.mapped_address == mapped
    assert path.on_event(RelayReady(("198.51.100.1", 443), 0x4000, relayed)) == StartHandshake()
    assert path.on_event(TurnRefreshed("allocation", 600)) is None
    assert path.on_event(TurnRefreshed("channel", 600)) is None
    assert path.turn_refreshes == 2
    assert path.on_event(TurnClosed(deallocated=True)) is None
    _attempt(path, 1.0)  # a new socket: its addresses are not known yet
    assert _addresses(path) == (None, None)
    assert path.turn_refreshes == 2  # a count over the session's life


def test_allocation_gives_the_mapped_address_when_no_stun_server_did() -> None:
    path = _path(NatMode.TURN)
    _attempt(path, 0.0)
    mapped = ("203.0.113.1", 4000)
    path.on_event(AllocationSucceeded(("192.0.2.7", 50000), mapped, 600))
    assert path.mapped_address == mapped


def test_failures_are_warned_about_or_end_the_attempt() -> None:
    path = _path(NatMode.AUTO)
    failed = BindingFailed(STUN, "STUN server 192.0.2.9:3478 did not answer")
    assert path.on_event(failed) == WarnOnce(failed.message)
    turn_failed = TurnFailed(TurnFailure.WRONG_CREDENTIALS, "wrong credentials", 401)
    assert path.on_event(turn_failed) == EndAttempt("wrong credentials")


ops = st.lists(
    st.tuples(
        st.sampled_from(["attempt", "timeout", "relay_failed"]),
        st.floats(min_value=0.0, max_value=2 * RETRY, allow_nan=False),
    ),
    max_size=40,
)


@given(ops=ops)
def test_auto_never_relays_longer_than_retry_direct_after(ops: list[tuple[str, float]]) -> None:
    """Whatever happens, an ``auto`` attempt goes through TURN only after a direct handshake
    timed out, and only within ``retry_direct_after`` of that fallback."""
    path = _path(NatMode.AUTO)
    now = 0.0
    fell_back_at: float | None = None
    for op, dt in ops:
        now += dt
        if op == "attempt":
            relay = _attempt(path, now)
            if relay:
                assert fell_back_at is not None and now - fell_back_at < RETRY
            else:
                fell_back_at = None
            assert path.path == ("turn" if relay else "direct")
        elif op == "timeout":
            direct = path.path == "direct"
            assert path.handshake_timed_out(now) == direct
            fell_back_at = now if direct else None
        else:
            path.relay_failed()
            fell_back_at = None
