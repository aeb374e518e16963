"""SOCKS5: codec properties and fuzzing, reply codes, UDP ASSOCIATE through a real relay."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping

import anyio
import anyio.abc
import pytest
from fuzz.socks5_request import test_one_input as fuzz_socks5
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.flow import (
    Address,
    Blocked,
    ConnContext,
    ConnectionRefused,
    ConnectTimeout,
    GeneralFailure,
    HostUnreachable,
    NetworkUnreachable,
    Outbound,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.inbounds.proxy.socks5 import (
    Socks5Error,
    encode_address,
    encode_udp_packet,
    parse_greeting,
    parse_request,
    parse_udp_packet,
    parse_userpass,
)
from ostp_client.outbounds.block import BlockOutbound
from ostp_client.outbounds.direct import DirectOutbound
from tests.client.proxy_helpers import base_config, proxy_port, running_daemon

pytestmark = pytest.mark.timeout(60)

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
domains = st.lists(_label, min_size=1, max_size=6).map(".".join)
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), domains)
addresses = st.builds(Address, hosts, st.integers(0, 65535))


@given(addresses, st.sampled_from([1, 3]))
def test_request_round_trip_and_every_prefix_needs_more(address: Address, command: int) -> None:
    raw = bytes((5, command, 0)) + encode_address(address)
    parsed = parse_request(raw + b"extra")
    assert parsed is not None
    request, used = parsed
    assert used == len(raw)
    assert request.target == address
    assert request.command == command
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None


@given(st.binary(max_size=255), st.binary(max_size=255))
def test_userpass_round_trip(user: bytes, password: bytes) -> None:
    raw = bytes((1, len(user))) + user + bytes((len(password),)) + password
    parsed = parse_userpass(raw)
    assert parsed is not None
    assert (parsed[0].username, parsed[0].password, parsed[1]) == (user, password, len(raw))


@given(st.lists(st.integers(0, 255), max_size=255))
def test_greeting_round_trip(methods: list[int]) -> None:
    raw = bytes((5, len(methods), *methods))
    parsed = parse_greeting(raw)
    assert parsed is not None
    assert parsed[0].methods == frozenset(methods)


@given(addresses, st.binary(max_size=2000))
def test_udp_packet_round_trip(address: Address, payload: bytes) -> None:
    packet = parse_udp_packet(encode_udp_packet(address, payload))
    assert (packet.frag, packet.target, packet.payload) == (0, address, payload)


def test_error_codes() -> None:
    with pytest.raises(Socks5Error) as bad_cmd:
        parse_request(b"\x05\x02\x00\x01" + bytes(6))  # BIND
    assert bad_cmd.value.reply == 0x07
    with pytest.raises(Socks5Error) as bad_atyp:
        parse_request(b"\x05\x01\x00\x09" + bytes(6))
    assert bad_atyp.value.reply == 0x08
    with pytest.raises(Socks5Error):
        parse_request(b"\x05\x01\x00\x03\x03a b\x00\x50")  # space in a name
    with pytest.raises(Socks5Error):
        parse_request(b"\x05\x01\x00\x03\x00\x00\x50")  # empty name
    with pytest.raises(Socks5Error) as bad_auth:
        parse_userpass(b"\x05\x01u\x01p")
    assert bad_auth.value.reply is None  # closed without a reply


@given(st.binary(max_size=600))
def test_fuzz_entry_point(data: bytes) -> None:
    fuzz_socks5(data)


@given(addresses)
def test_fuzz_entry_point_on_valid_input(address: Address) -> None:
    fuzz_socks5(b"\x05\x01\x00" + b"\x05\x01\x00" + encode_address(address))
    fuzz_socks5(b"\x00\x00\x00" + encode_address(address) + b"payload")


# --------------------------------------------------------------------------------------------
# a raw SOCKS5 client against the real inbound


async def _socks_request(
    port: int, request: bytes, methods: bytes = b"\x00"
) -> tuple[anyio.abc.SocketStream, bytes]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05" + bytes((len(methods),)) + methods)
    assert await stream.receive() == b"\x05\x00"
    await stream.send(request)
    reply = b""
    with anyio.fail_after(10):
        while len(reply) < 10:
            try:
                reply += await stream.receive()
            except anyio.EndOfStream:
                break
    return stream, reply


class FailingOutbound(Outbound):
    """Raises the error named by the target's first label (for the reply-code table)."""

    ERRORS: Mapping[str, type[OutboundError]] = {
        "blocked": Blocked,
        "netunreach": NetworkUnreachable,
        "unreach": HostUnreachable,
        "refused": ConnectionRefused,
        "timeout": ConnectTimeout,
        "fail": GeneralFailure,
    }

    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        raise self.ERRORS[target.host.split(".")[0]]("test")

    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        raise GeneralFailure("no UDP")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "code", "http_status"),
    [
        ("blocked", 0x02, 403),
        ("netunreach", 0x03, 502),
        ("unreach", 0x04, 502),
        ("refused", 0x05, 502),
        ("timeout", 0x06, 504),
        ("fail", 0x01, 502),
    ],
)
async def test_reply_code_and_http_status_for_each_failure(
    name: str, code: int, http_status: int
) -> None:
    config = base_config()
    config["routing"]["rules"] = []
    config["outbounds"] = [{"type": "direct", "tag": "direct"}]
    outbounds: dict[str, Outbound] = {"direct": FailingOutbound("direct")}
    async with running_daemon(config, outbounds=outbounds) as daemon:
        port = proxy_port(daemon)
        target = Address(f"{name}.test", 80)
        stream, reply = await _socks_request(port, b"\x05\x01\x00" + encode_address(target))
        await stream.aclose()
        assert reply[:2] == bytes((5, code))
        http = await anyio.connect_tcp("127.0.0.1", port)
        await http.send(f"GET http://{name}.test/ HTTP/1.1\r\nHost: {name}.test\r\n\r\n".encode())
        head = await http.receive()
        await http.aclose()
        assert head.startswith(f"HTTP/1.1 {http_status} ".encode())


@pytest.mark.anyio
async def test_unsupported_command_and_address_type() -> None:
    async with running_daemon(base_config()) as daemon:
        port = proxy_port(daemon)
        stream, reply = await _socks_request(port, b"\x05\x02\x00\x01" + bytes(6))
        await stream.aclose()
        assert reply[:2] == b"\x05\x07"
        stream, reply = await _socks_request(port, b"\x05\x01\x00\x07" + bytes(6))
        await stream.aclose()
        assert reply[:2] == b"\x05\x08"


@pytest.mark.anyio
async def test_connect_refused_by_a_real_closed_port() -> None:
    async with running_daemon(base_config()) as daemon:
        stream, reply = await _socks_request(
            proxy_port(daemon), b"\x05\x01\x00" + encode_address(Address("127.0.0.1", 1))
        )
        await stream.aclose()
        assert reply[:2] == b"\x05\x05"


@pytest.mark.anyio
async def test_no_acceptable_method_when_users_are_configured() -> None:
    config = base_config(users=[{"username": "u", "password": "p"}])
    async with running_daemon(config) as daemon:
        stream = await anyio.connect_tcp("127.0.0.1", proxy_port(daemon))
        await stream.send(b"\x05\x01\x00")
        assert await stream.receive() == b"\x05\xff"
        await stream.aclose()
        stream = await anyio.connect_tcp("127.0.0.1", proxy_port(daemon))
        await stream.send(b"\x05\x01\x02")
        assert await stream.receive() == b"\x05\x02"
        await stream.send(b"\x01\x01u\x01x")
        assert await stream.receive() == b"\x01\x01"
        await stream.aclose()


async def _read_to_eof(stream: anyio.abc.SocketStream) -> bytes:
    received = b""
    with anyio.fail_after(10):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


@pytest.mark.anyio
@pytest.mark.parametrize("users", [True, False])
@pytest.mark.parametrize("version", [0x00, 0x02, 0x05, 0xFF])
async def test_a_sub_negotiation_that_is_not_rfc_1929_is_closed_without_a_reply(
    users: bool, version: int
) -> None:
    config = base_config(users=[{"username": "u", "password": "p"}] if users else [])
    async with running_daemon(config) as daemon:
        stream = await anyio.connect_tcp("127.0.0.1", proxy_port(daemon))
        await stream.send(b"\x05\x01\x02")
        assert await stream.receive() == b"\x05\x02"
        await stream.send(bytes((version,)) + b"\x01u\x01p")
        assert await _read_to_eof(stream) == b""  # RFC 1929 §2: no SOCKS5-style reply
        await stream.aclose()
        # a good sub-negotiation still gets VER=1 STATUS=0
        stream = await anyio.connect_tcp("127.0.0.1", proxy_port(daemon))
        await stream.send(b"\x05\x01\x02")
        assert await stream.receive() == b"\x05\x02"
        await stream.send(b"\x01\x01u\x01p")
        assert await stream.receive() == b"\x01\x00"
        await stream.aclose()


async def _udp_echo(sock: anyio.abc.UDPSocket) -> None:
    async for data, (host, port) in sock:
        await sock.sendto(b"echo:" + data, host, port)


def _parse_reply_address(reply: bytes) -> Address:
    assert reply[:3] == b"\x05\x00\x00"
    parsed = parse_request(b"\x05\x01\x00" + reply[3:])
    assert parsed is not None
    return parsed[0].target


@pytest.mark.anyio
async def test_udp_associate_relays_to_a_udp_echo() -> None:
    config = base_config()
    config["routing"]["rules"].append({"network": "udp", "port": [9], "outbound": "block"})
    async with (
        await anyio.create_udp_socket(local_host="127.0.0.1") as echo,
        anyio.create_task_group() as tg,
        running_daemon(config) as daemon,
    ):
        tg.start_soon(_udp_echo, echo)
        echo_addr = Address("127.0.0.1", echo.extra(anyio.abc.SocketAttribute.local_port))
        control, reply = await _socks_request(proxy_port(daemon), b"\x05\x03\x00\x01" + bytes(6))
        relay = _parse_reply_address(reply)
        assert relay.host == "127.0.0.1"
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as client:
            # FRAG != 0 and a blocked target are dropped; only "two" and "three" come back.
            frag = b"\x00\x00\x01" + encode_address(echo_addr) + b"one"
            await client.sendto(frag, relay.host, relay.port)
            blocked = encode_udp_packet(Address("127.0.0.1", 9), b"blocked")
            await client.sendto(blocked, relay.host, relay.port)
            for word in (b"two", b"three"):
                await client.sendto(encode_udp_packet(echo_addr, word), relay.host, relay.port)
            replies = []
            with anyio.fail_after(10):
                for _ in range(2):
                    data, _sender = await client.receive()
                    replies.append(parse_udp_packet(data))
            assert [(p.target, p.payload) for p in replies] == [
                (echo_addr, b"echo:two"),
                (echo_addr, b"echo:three"),
            ]
            live = list(daemon.registry.live.values())
            assert any(c.network == "udp" and c.bytes_down == 18 for c in live)
        await control.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_direct_udp_session_resolves_names_and_reports_sources() -> None:
    async with (
        await anyio.create_udp_socket(local_host="127.0.0.1") as echo,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_udp_echo, echo)
        port = echo.extra(anyio.abc.SocketAttribute.local_port)
        ctx = ConnContext(1, "test", "udp")
        session = await DirectOutbound("direct", override_address="127.0.0.1").open_udp(ctx)
        async with session:
            await session.send_to(Address("anything.test", port), b"hi")
            with anyio.fail_after(10):
                source, data = await session.receive()
        assert (source, data) == (Address("127.0.0.1", port), b"echo:hi")
        assert ipaddress.ip_address(source.host).version == 4
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_block_outbound_refuses_udp() -> None:
    with pytest.raises(Blocked):
        await BlockOutbound("block").open_udp(ConnContext(1, "t", "udp"))


def test_encode_address_forms() -> None:
    assert encode_address(Address("1.2.3.4", 80)) == b"\x01\x01\x02\x03\x04" + struct.pack("!H", 80)
    assert encode_address(Address("::1", 1))[0] == 4
    assert encode_address(Address("a.b", 1)) == b"\x03\x03a.b\x00\x01"
