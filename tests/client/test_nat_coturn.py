"""STUN and TURN against a real coturn on loopback, through a thin blocking socket driver.

The driver is test-only: one UDP socket (as the session will have), a NatMux fed with what the
socket reads, and a UDP echo peer standing in for the OSTP server.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ostp_client.nat import (
    AllocationSucceeded,
    BindingSucceeded,
    NatConfig,
    NatEvent,
    NatMux,
    RelayReady,
    TurnClosed,
    TurnConfig,
    TurnFailed,
    TurnFailure,
    TurnRefreshed,
)
from ostp_client.nat.stun import MessageClass, Method, encode_message

from .coturn_helpers import Coturn, free_udp_port, requires_coturn, running_coturn

Address = tuple[str, int]

pytestmark = [pytest.mark.timeout(60), requires_coturn]


@pytest.fixture
def coturn_factory(tmp_path: Path) -> Iterator[Callable[..., Coturn]]:
    """Start coturn on a free loopback port (extra flags as arguments); stopped at teardown."""
    with ExitStack() as stack:

        def start(*extra: str) -> Coturn:
            return stack.enter_context(running_coturn(tmp_path, *extra))

        yield start


@dataclass
class Driver:
    """Blocking loop around one NatMux on one socket, plus a UDP echo peer."""

    mux: NatMux
    sock: socket.socket = field(init=False)
    echo: socket.socket = field(init=False)
    events: list[NatEvent] = field(default_factory=list)
    received: list[tuple[bytes, Address]] = field(default_factory=list)
    echo_sources: list[Address] = field(default_factory=list)
    extra_socks: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.echo.bind(("127.0.0.1", 0))

    @property
    def address(self) -> Address:
        addr: Address = self.sock.getsockname()
        return addr

    @property
    def echo_address(self) -> Address:
        addr: Address = self.echo.getsockname()
        return addr

    def close(self) -> None:
        self.sock.close()
        self.echo.close()

    def flush(self) -> None:
        for data, addr in self.mux.datagrams_to_send(time.monotonic()):
            self.sock.sendto(data, addr)
        while (event := self.mux.next_event()) is not None:
            self.events.append(event)

    def send(self, data: bytes, to: Address) -> None:
        wire, addr = self.mux.wrap(data, to)
        self.sock.sendto(wire, addr)

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        end = time.monotonic() + timeout
        self.flush()
        while not done():
            now = time.monotonic()
            if now >= end:
                raise AssertionError(f"timed out; events so far: {self.events}")
            timer = self.mux.get_timer()
            wait = min(end, timer if timer is not None else end) - now
            readable, _, _ = select.select([self.sock, self.echo], [], [], max(wait, 0))
            now = time.monotonic()
            if self.echo in readable:
                data, addr = self.echo.recvfrom(65535)
                self.echo_sources.append(addr)
                self.echo.sendto(data, addr)
            if self.sock in readable:
                data, addr = self.sock.recvfrom(65535)
                out = self.mux.receive_datagram(data, addr, now)
                if out is not None:
                    self.received.append(out)
            timer = self.mux.get_timer()
            if timer is not None and timer <= now:
                self.mux.handle_timer(now)
            self.flush()

    def has(self, kind: type) -> Callable[[], bool]:
        return lambda: any(isinstance(e, kind) for e in self.events)

    def first(self, kind: type[NatEvent]) -> NatEvent:
        return next(e for e in self.events if isinstance(e, kind))


@pytest.fixture
def driver_factory() -> Iterator[Callable[[NatConfig], Driver]]:
    drivers: list[Driver] = []

    def make(config: NatConfig) -> Driver:
        driver = Driver(NatMux(config))
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()


def _turn(server: Address, password: str = "p", **kwargs: object) -> NatConfig:
    return NatConfig(turn=TurnConfig(server=server, username="u", password=password, **kwargs))  # type: ignore[arg-type]


def _relay(driver: Driver) -> None:
    driver.mux.start_turn(driver.echo_address, time.monotonic())
    driver.run_until(lambda: driver.has(RelayReady)() or driver.has(TurnFailed)(), timeout=10)
    assert not driver.has(TurnFailed)(), driver.events


def _round_trip(driver: Driver, count: int) -> None:
    start = len(driver.received)
    payloads = [os.urandom(16) + i.to_bytes(4, "big") for i in range(count)]
    for payload in payloads:
        driver.send(payload, driver.echo_address)
    driver.run_until(lambda: len(driver.received) >= start + count, timeout=10)
    got = driver.received[start:]
    assert sorted(p for p, _ in got) == sorted(payloads)
    assert {addr for _, addr in got} == {driver.echo_address}


def test_binding_maps_to_own_loopback_address(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    coturn = coturn_factory()
    driver = driver_factory(NatConfig())
    driver.mux.start_binding(coturn.server, time.monotonic())
    driver.run_until(driver.has(BindingSucceeded), timeout=10)
    event = driver.first(BindingSucceeded)
    assert isinstance(event, BindingSucceeded)
    assert event.mapped_address == driver.address
    assert driver.mux.mapped_address == driver.address


def test_allocate_permission_channel_and_channel_data_round_trip(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    coturn = coturn_factory()
    driver = driver_factory(_turn(coturn.server))
    _relay(driver)
    allocated = driver.first(AllocationSucceeded)
    ready = driver.first(RelayReady)
    assert isinstance(allocated, AllocationSucceeded) and isinstance(ready, RelayReady)
    assert allocated.mapped_address == driver.address
    assert allocated.relayed_address[0] == "127.0.0.1"
    assert ready.peer == driver.echo_address and ready.channel == 0x4000
    assert driver.mux.relaying
    _round_trip(driver, 50)
    # The echo peer saw the relayed address, not our socket: the data went through coturn.
    assert set(driver.echo_sources) == {allocated.relayed_address}
    driver.mux.close(time.monotonic())
    driver.run_until(driver.has(TurnClosed), timeout=10)
    closed = driver.first(TurnClosed)
    assert isinstance(closed, TurnClosed) and closed.deallocated


def test_wrong_password_is_a_clear_error(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    coturn = coturn_factory()
    driver = driver_factory(_turn(coturn.server, password="wrong"))
    driver.mux.start_turn(driver.echo_address, time.monotonic())
    driver.run_until(driver.has(TurnFailed), timeout=10)
    failed = driver.first(TurnFailed)
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.WRONG_CREDENTIALS
    assert failed.error_code == 401
    assert "username and password" in failed.message
    assert "wrong" not in failed.message  # the password is never shown


def test_unreachable_turn_server_times_out(
    driver_factory: Callable[[NatConfig], Driver],
) -> None:
    # Nothing listens on this port; shortened retransmissions keep the test quick.
    port = free_udp_port()
    config = NatConfig(
        rto=0.05,
        rc=3,
        rm=2,
        turn=TurnConfig(server=("127.0.0.1", port), username="u", password="p"),
    )
    driver = driver_factory(config)
    driver.mux.start_turn(driver.echo_address, time.monotonic())
    driver.run_until(driver.has(TurnFailed), timeout=10)
    failed = driver.first(TurnFailed)
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.UNREACHABLE
    assert "unreachable" in failed.message


def test_short_lifetimes_are_refreshed_and_relay_keeps_working(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    # coturn 4.6 never grants an allocation below 600 s (it raises shorter LIFETIMEs to that
    # minimum), so the allocation refresh is brought forward with refresh_fraction (600 s x
    # 0.005 = 3 s) while channel and permission really expire after 4 s on the server: the
    # round trip at the end, long after 4 s, only works because they were refreshed in time.
    coturn = coturn_factory("--channel-lifetime", "4", "--permission-lifetime", "4")
    driver = driver_factory(
        _turn(coturn.server, refresh_fraction=0.005, permission_refresh=2.0, channel_refresh=2.0)
    )
    _relay(driver)
    _round_trip(driver, 5)

    def refreshed(what: str, times: int) -> Callable[[], bool]:
        return lambda: (
            sum(isinstance(e, TurnRefreshed) and e.what == what for e in driver.events) >= times
        )

    driver.run_until(
        lambda: (
            refreshed("allocation", 3)()
            and refreshed("channel", 4)()
            and refreshed("permission", 4)()
        ),
        timeout=20,
    )
    assert not driver.has(TurnFailed)(), driver.events
    _round_trip(driver, 10)


def test_stale_nonce_is_retried_with_the_new_nonce(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    coturn = coturn_factory("--stale-nonce=2")
    driver = driver_factory(
        _turn(coturn.server, refresh_fraction=0.005, permission_refresh=2.5, channel_refresh=2.5)
    )
    _relay(driver)
    # Refreshes after the nonce went stale get 438 and are resent with the new nonce.
    driver.run_until(
        lambda: sum(isinstance(e, TurnRefreshed) for e in driver.events) >= 4, timeout=20
    )
    assert not driver.has(TurnFailed)(), driver.events
    _round_trip(driver, 5)
    assert driver.mux.turn is not None
    assert driver.mux.turn.stale_nonce_retries > 0, "coturn never declared the nonce stale"


def test_stray_stun_looking_datagrams_do_not_disturb(
    coturn_factory: Callable[..., Coturn], driver_factory: Callable[[NatConfig], Driver]
) -> None:
    coturn = coturn_factory()
    driver = driver_factory(_turn(coturn.server))
    _relay(driver)
    strays = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    strays.bind(("127.0.0.1", 0))
    try:
        bogus = [
            # A success response for a transaction that is not ours.
            encode_message(Method.ALLOCATE, MessageClass.SUCCESS, os.urandom(12)),
            # A STUN-looking message with a broken FINGERPRINT.
            encode_message(Method.BINDING, MessageClass.SUCCESS, os.urandom(12))[:-1] + b"\x00",
            # A request (we are no server).
            encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)),
        ]
        for data in bogus:
            strays.sendto(data, driver.address)
        driver.run_until(
            lambda: (
                driver.mux.counters.stun_unknown_transaction_drop
                + driver.mux.counters.stun_fingerprint_drop
                + driver.mux.counters.stun_unexpected_drop
                >= 3
            ),
            timeout=10,
        )
        assert driver.received == []  # none of them reached the OSTP layer
        assert driver.mux.relaying
        _round_trip(driver, 10)
    finally:
        strays.close()
