"""The routing mark on the daemon's own sockets: `ostp_client.net.bypass`, the happy-eyeballs
connector that sets it before `connect()`, and the `direct` outbound's TCP and UDP sockets.

Everything talks to listeners on loopback. Reading a mark back needs nothing special, setting
one needs CAP_NET_ADMIN: those tests skip (outside CI) without root.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.flow import Address, ConnContext, ConnectionRefused
from ostp_client.net import bypass
from ostp_client.net.bypass import (
    SO_MARK,
    BypassError,
    apply_bypass,
    clear_routing_mark,
    routing_mark,
    set_routing_mark,
)
from ostp_client.outbounds.direct import DirectOutbound, DirectUdpSession, map_os_error
from ostp_client.outbounds.happy_eyeballs import connect_tcp, interleave
from tests.conftest import is_root, require

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _need_mark_privilege() -> None:
    if sys.platform != "linux":
        pytest.skip("SO_MARK is Linux-only")  # not a missing requirement: nothing to test
    require(is_root(), "setting SO_MARK needs root (CAP_NET_ADMIN)")


@pytest.fixture
def process_mark() -> Iterator[int]:
    """A process-wide mark for the duration of one test."""
    set_routing_mark(0x5A5A)
    try:
        yield 0x5A5A
    finally:
        clear_routing_mark()


def _mark_of(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_MARK)


# -- the process-wide setting -------------------------------------------------------------------


def test_set_and_clear() -> None:
    assert routing_mark() is None
    set_routing_mark(7)
    try:
        assert routing_mark() == 7
        clear_routing_mark(8)  # somebody else's: ignored
        assert routing_mark() == 7
        clear_routing_mark(7)
        assert routing_mark() is None
    finally:
        clear_routing_mark()
    for bad in (0, -1, 1 << 32):
        with pytest.raises(ValueError, match="out of range"):
            set_routing_mark(bad)


def test_nothing_to_apply_without_a_mark() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert apply_bypass(sock) is False


class _RefusingSocket(socket.socket):
    def setsockopt(self, *args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")


def test_a_refused_mark_is_an_error_not_a_silent_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bypass, "so_mark_supported", lambda: True)
    with _RefusingSocket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(BypassError, match="CAP_NET_ADMIN") as info:
            apply_bypass(sock, 0x2022)
        assert info.value.errno == errno.EPERM


def test_apply_sets_the_given_or_the_process_mark(process_mark: int) -> None:
    _need_mark_privilege()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        assert apply_bypass(sock) is True
        assert _mark_of(sock) == process_mark
        assert apply_bypass(sock, 0x77) is True
        assert _mark_of(sock) == 0x77


# -- happy eyeballs ordering ---------------------------------------------------------------------

V4, V6 = socket.AF_INET, socket.AF_INET6


def test_interleave_alternates_starting_with_the_first_family() -> None:
    a4, b4, c4 = ((V4, (f"192.0.2.{i}", 80)) for i in (1, 2, 3))
    a6, b6 = ((V6, (f"2001:db8::{i}", 80, 0, 0)) for i in (1, 2))
    assert interleave([a6, b6, a4, b4, c4]) == [a6, a4, b6, b4, c4]
    assert interleave([a4, b4, c4, a6, a4]) == [a4, a6, b4, c4]
    assert interleave([]) == []


@given(st.lists(st.tuples(st.sampled_from([V4, V6]), st.integers(0, 5))))
def test_interleave_is_a_deduplicated_alternating_permutation(
    items: list[tuple[int, int]],
) -> None:
    targets = [(family, (str(n), 80)) for family, n in items]
    out = interleave(targets)
    assert sorted(out) == sorted(set(targets))
    if out:
        assert out[0][0] == targets[0][0]
    families = [f for f, _ in out]
    # no two of a family in a row while the other still has addresses left
    for i in range(len(families) - 1):
        if families[i] == families[i + 1]:
            assert families[i + 1 :].count(families[i]) == len(families) - i - 1


# -- connecting ----------------------------------------------------------------------------------


async def test_connects_by_name_when_one_family_refuses() -> None:
    # "localhost" has ::1 and 127.0.0.1 here; only IPv4 listens: the IPv6 attempt is refused
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:

        async def serve() -> None:
            async def handle(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    await stream.send(b"hello")

            await listener.serve(handle)

        tg.start_soon(serve)
        with anyio.fail_after(10):
            stream = await connect_tcp("localhost", port, attempt_delay=5)
        async with stream:
            assert await stream.receive() == b"hello"
            raw = stream.extra(SocketAttribute.raw_socket)
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        tg.cancel_scope.cancel()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_all_attempts_refused_maps_to_connection_refused() -> None:
    port = _free_port()
    with pytest.raises(OSError) as info:
        await connect_tcp("127.0.0.1", port)
    assert isinstance(map_os_error(info.value, "x"), ConnectionRefused)
    with pytest.raises(OSError) as info:
        await connect_tcp("localhost", port)
    assert isinstance(map_os_error(info.value, "x"), ConnectionRefused)
    with pytest.raises(OSError, match="no address"):
        await connect_tcp("::1", port, local_host="127.0.0.1")


async def test_marked_connect_and_direct_outbound_marks(process_mark: int) -> None:
    _need_mark_privilege()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    ctx = ConnContext(1, "test")
    async with listener, anyio.create_task_group() as tg:

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.send(b"ok")

        tg.start_soon(listener.serve, handle)
        with anyio.fail_after(10):
            explicit = await connect_tcp("127.0.0.1", port, mark=0x99)
            async with explicit:
                assert _mark_of(explicit.extra(SocketAttribute.raw_socket)) == 0x99
            # the outbound's own option wins over the process-wide mark ...
            own = await DirectOutbound("d", routing_mark=0x42).connect_tcp(
                Address("127.0.0.1", port), ctx
            )
            async with own:
                assert _mark_of(own.extra(SocketAttribute.raw_socket)) == 0x42
                assert await own.receive() == b"ok"
            # ... which applies when the outbound has none
            shared = await DirectOutbound("d").connect_tcp(Address("localhost", port), ctx)
            async with shared:
                assert _mark_of(shared.extra(SocketAttribute.raw_socket)) == process_mark
        tg.cancel_scope.cancel()


async def test_direct_udp_sockets_carry_the_mark(process_mark: int) -> None:
    _need_mark_privilege()
    ctx = ConnContext(1, "test")
    for outbound, expected in (
        (DirectOutbound("d"), process_mark),
        (DirectOutbound("d", routing_mark=3), 3),
    ):
        session = await outbound.open_udp(ctx)
        async with session:
            assert isinstance(session, DirectUdpSession)
            assert _mark_of(session._sock.extra(SocketAttribute.raw_socket)) == expected
    clear_routing_mark()
    async with await DirectOutbound("d").open_udp(ctx) as session:
        assert isinstance(session, DirectUdpSession)
        assert _mark_of(session._sock.extra(SocketAttribute.raw_socket)) == 0


def test_tun_inbound_claims_its_mark_only_with_auto_route_on_linux() -> None:
    from ostp_client.config import TunInboundConfig, parse_config_text
    from ostp_client.connections import ConnectionRegistry, Dispatcher
    from ostp_client.inbounds.tun.inbound import TunInbound
    from ostp_client.router import Router

    parsed, _ = parse_config_text('{"outbounds": [{"type": "direct"}]}')
    outbounds = {"direct": DirectOutbound()}
    dispatcher = Dispatcher(Router(parsed.routing, outbounds), outbounds, ConnectionRegistry())
    try:
        off = TunInbound(TunInboundConfig(auto_route=False, routing_mark=9), dispatcher)
        assert off.claim_routing_mark() is False and routing_mark() is None
        seam = TunInbound(TunInboundConfig(routing_mark=9), dispatcher, configure_system=False)
        assert seam.claim_routing_mark() is False and routing_mark() is None
        on = TunInbound(TunInboundConfig(routing_mark=9), dispatcher)
        assert on.claim_routing_mark() is (sys.platform == "linux")
        assert routing_mark() == (9 if sys.platform == "linux" else None)
        assert on.status().routing_mark == 9
    finally:
        clear_routing_mark()


@pytest.mark.anyio
async def test_direct_refuses_the_tuns_own_fake_addresses() -> None:
    from ostp_client.flow import Address, ConnContext, HostUnreachable
    from ostp_client.net.bypass import clear_tunnel_networks, inside_tunnel, set_tunnel_networks
    from ostp_client.outbounds.direct import DirectOutbound

    direct = DirectOutbound("direct", connect_timeout=2)
    set_tunnel_networks(["198.18.0.0/15", "fc00:18::/64"])
    try:
        assert inside_tunnel("198.19.255.1") and inside_tunnel("fc00:18::5")
        assert not inside_tunnel("203.0.113.9") and not inside_tunnel("example.com")
        with pytest.raises(HostUnreachable, match="fake addresses"):
            await direct.connect_tcp(Address("198.18.3.4", 80), ConnContext(1, "tun-in"))
    finally:
        clear_tunnel_networks()
    assert not inside_tunnel("198.19.255.1")


@pytest.mark.anyio
async def test_connect_tcp_races_addresses_the_caller_resolved() -> None:
    from ostp_client.outbounds import happy_eyeballs

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    async with listener:
        # the name is not resolved at all: "does-not-resolve.invalid" would fail if it were
        stream = await happy_eyeballs.connect_tcp(
            "does-not-resolve.invalid", port, addresses=["::1", "127.0.0.1"], attempt_delay=5
        )
        async with stream:
            assert stream.extra(SocketAttribute.remote_address)[:2] == ("127.0.0.1", port)
