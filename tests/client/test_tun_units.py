"""TUN inbound parts without root: DNS codec and fake-IP pool, route plans, the virtio-net
header, the Wintun code path against a fake DLL, and the config model."""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from typing import Any

import pytest
from fuzz.dns_message import test_one_input as fuzz_dns
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_client.config import (
    ConfigError,
    DirectOutboundConfig,
    TunInboundConfig,
    parse_config_text,
)
from ostp_client.dns.codec import (
    TYPE_A,
    TYPE_AAAA,
    DnsFormatError,
    FakeIpPool,
    build_answer,
    build_error,
    parse_query,
)
from ostp_client.inbounds.tun.linux import (
    RULE_PRIORITY,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    plan_policy_routing,
    stale_rule_deletions,
    undo_command,
    vnet_header_for,
)
from ostp_client.inbounds.tun.wintun import WintunDevice, WintunError


def _query(name: str, qtype: int = TYPE_A, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


# -- DNS ---------------------------------------------------------------------------------------


def test_parse_query_and_answer_round_trip() -> None:
    query = parse_query(_query("WWW.Example.COM", TYPE_AAAA))
    assert (query.id, query.name, query.qtype, query.qclass) == (0x1234, "www.example.com", 28, 1)
    answer = build_answer(query, [ipaddress.ip_address("fc00::5")], ttl=7)
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", answer)
    assert (ident, flags & 0x8000, flags & 0xF, qd, an, ns, ar) == (0x1234, 0x8000, 0, 1, 1, 0, 0)
    rr = answer[12 + len(query.question) :]
    assert struct.unpack_from("!HHHIH", rr) == (0xC00C, 28, 1, 7, 16)
    assert rr[-16:] == ipaddress.ip_address("fc00::5").packed
    error = build_error(query)
    assert struct.unpack_from("!HH", error)[1] & 0xF == 2  # SERVFAIL


def test_parse_query_follows_a_compression_pointer_and_rejects_loops() -> None:
    head = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    pointed = head + b"\xc0\x12" + b"\0\x01\0\x01" + b"\x03abc\x00"
    assert parse_query(pointed).name == "abc"
    loop = head + b"\xc0\x0c" + b"\0\x01\0\x01"
    with pytest.raises(DnsFormatError):
        parse_query(loop)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 11,
        struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0) + b"\0\0\1\0\1",  # a response
        struct.pack("!HHHHHH", 1, 0, 0, 0, 0, 0),  # no question
        struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x05ab",  # truncated label
        struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\0\0\1\0\1",
        struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\0\0\1",  # truncated question
    ],
)
def test_parse_query_rejects_garbage(data: bytes) -> None:
    with pytest.raises(DnsFormatError):
        parse_query(data)


@given(st.binary(max_size=600))
def test_fuzz_entry_point_on_random_bytes(data: bytes) -> None:
    fuzz_dns(data)


@given(
    st.lists(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=5),
    st.integers(0, 0xFFFF),
    st.sampled_from([TYPE_A, TYPE_AAAA, 16, 15]),
    st.binary(max_size=8),
)
@settings(max_examples=200)
def test_well_formed_queries_parse_and_mutations_never_crash(
    labels: list[str], ident: int, qtype: int, tail: bytes
) -> None:
    data = _query(".".join(labels), qtype, ident)
    query = parse_query(data + tail)
    assert query.name == ".".join(labels) and query.qtype == qtype and query.id == ident
    fuzz_dns(data + tail)
    for cut in range(len(data)):
        fuzz_dns(data[:cut])


def test_fake_ip_pool_skips_excluded_and_reuses_least_recent() -> None:
    pool = FakeIpPool("198.18.0.0/28", "fc00::/120", exclude=["198.18.0.0/30"], capacity=3)
    a = pool.address_for("a.test")
    b = pool.address_for("b.test")
    assert a == ipaddress.ip_address("198.18.0.4") and b == ipaddress.ip_address("198.18.0.5")
    assert pool.address_for("a.test") == a  # stable; and now the most recent
    c = pool.address_for("c.test")
    d = pool.address_for("d.test")  # capacity 3: b (least recently used) gives its address up
    assert d == b and pool.lookup(str(b)) == "d.test" and pool.lookup(str(a)) == "a.test"
    # lookups count as use too: c is now the least recent, so b.test takes its address
    assert pool.address_for("b.test") == c and pool.lookup(str(c)) == "b.test"
    assert pool.address_for("a.test", 6) == ipaddress.ip_address("fc00::1")
    assert pool.lookup("198.18.0.200") is None and pool.lookup("not an ip") is None
    assert FakeIpPool("198.18.0.0/15").address_for("x", 6) is None


@given(st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), max_size=60))
def test_fake_ip_pool_is_a_bijection(names: list[str]) -> None:
    pool = FakeIpPool("198.18.0.0/26", exclude=["198.18.0.0/30"], capacity=16)
    for name in names:
        address = pool.address_for(name)
        assert address is not None and pool.lookup(address) == name
        assert address not in ipaddress.ip_network("198.18.0.0/30")
    live = {str(pool.address_for(n)) for n in dict.fromkeys(names[-16:])}
    assert len(live) == len(set(names[-16:]))


# -- routes and the device header ----------------------------------------------------------------


def test_policy_plan_fills_the_table_then_adds_the_rules() -> None:
    plan = plan_policy_routing(
        "ostp0", 2022, 0x2022, ["192.0.2.2/32", "2001:db8::2", "192.0.2.2/32", "10.0.0.0/8"]
    )
    assert plan == [
        ["ip", "-4", "route", "add", "0.0.0.0/0", "dev", "ostp0", "table", "2022"],
        ["ip", "-6", "route", "add", "::/0", "dev", "ostp0", "table", "2022"],
        ["ip", "-4", "route", "add", "throw", "192.0.2.2/32", "table", "2022"],
        ["ip", "-6", "route", "add", "throw", "2001:db8::2/128", "table", "2022"],
        ["ip", "-4", "route", "add", "throw", "10.0.0.0/8", "table", "2022"],
        ["ip", "-4", "rule", "add", "pref", "9020", "lookup", "main", "suppress_prefixlength", "0"],
        ["ip", "-4", "rule", "add", "pref", "9021", "not", "fwmark", "0x2022", "lookup", "2022"],
        ["ip", "-6", "rule", "add", "pref", "9020", "lookup", "main", "suppress_prefixlength", "0"],
        ["ip", "-6", "rule", "add", "pref", "9021", "not", "fwmark", "0x2022", "lookup", "2022"],
    ]
    assert RULE_PRIORITY == 9020
    assert undo_command(plan[-1])[3] == "del"
    v4_only = plan_policy_routing("t", 7, 1, ["2001:db8::/32", "192.0.2.0/24"], ipv6=False)
    assert all(c[1] == "-4" for c in v4_only) and len(v4_only) == 4


RULES_AFTER_A_CRASH = """0:\tfrom all lookup local
9000:\tfrom all lookup main suppress_prefixlength 0
9020:\tfrom all lookup main suppress_prefixlength 0
9021:\tnot from all fwmark 0x2022 lookup 2022
9030:\tfrom all lookup main
9500:\tfrom all lookup 2022
9600:\tfrom all lookup 20221
32766:\tfrom all lookup main
32767:\tfrom all lookup default
"""


def test_stale_rules_are_found_by_table_and_priority_only() -> None:
    def texts(commands: list[list[str]]) -> list[str]:
        return [" ".join(c) for c in commands]

    assert texts(stale_rule_deletions("-4", RULES_AFTER_A_CRASH, 2022)) == [
        "ip -4 rule del pref 9020 from all lookup main suppress_prefixlength 0",
        "ip -4 rule del pref 9021 not from all fwmark 0x2022 lookup 2022",
        "ip -4 rule del pref 9500 from all lookup 2022",
    ]
    assert texts(stale_rule_deletions("-6", RULES_AFTER_A_CRASH, 100, priority=9000)) == [
        "ip -6 rule del pref 9000 from all lookup main suppress_prefixlength 0",
    ]
    assert stale_rule_deletions("-4", "", 2022) == []


@given(st.text(max_size=300), st.integers(1, 0xFFFFFFFF))
@settings(max_examples=300, deadline=None)
def test_stale_rule_parsing_never_raises_and_only_picks_our_table(text: str, table: int) -> None:
    for command in stale_rule_deletions("-4", text, table):
        assert command[:5] == ["ip", "-4", "rule", "del", "pref"]
        words = command[6:]
        assert str(table) in words or ("main" in words and command[5] == str(RULE_PRIORITY))


def test_vnet_header_asks_the_kernel_for_transport_checksums() -> None:
    tcp4 = bytes([0x45]) + bytes(8) + bytes([6]) + bytes(30)
    assert struct.unpack("<BBHHHH", vnet_header_for(tcp4)) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        0,
        0,
        0,
        20,
        16,
    )
    udp6 = bytes([0x60]) + bytes(5) + bytes([17]) + bytes(50)
    assert struct.unpack("<BBHHHH", vnet_header_for(udp6))[4:] == (40, 6)
    icmp4 = bytes([0x46]) + bytes(8) + bytes([1]) + bytes(30)
    assert vnet_header_for(icmp4) == bytes(10)
    assert vnet_header_for(b"") == bytes(10)


# -- Wintun against a fake DLL -------------------------------------------------------------------


class FakeWintun:
    """wintun.dll's functions over real ctypes memory (pointers are real addresses)."""

    def __init__(self, fail_adapter: bool = False) -> None:
        self.fail_adapter = fail_adapter
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self._buffers: dict[int, Any] = {}
        self.released: list[int] = []
        self.calls: list[str] = []
        self.ring_full = False

    def WintunCreateAdapter(self, name: str, tunnel_type: str, guid: object) -> int:
        self.calls.append(f"create {name} {tunnel_type}")
        return 0 if self.fail_adapter else 11

    def WintunStartSession(self, adapter: int, capacity: int) -> int:
        assert adapter == 11 and capacity >= 0x20000
        self.calls.append("start")
        return 22

    def WintunGetReadWaitEvent(self, session: int) -> int:
        return 33

    def WintunReceivePacket(self, session: int, size_ref: Any) -> int:
        assert session == 22
        if not self.inbox:
            return 0
        buf = ctypes.create_string_buffer(self.inbox.pop(0))
        size_ref._obj.value = len(buf.raw) - 1
        address = ctypes.addressof(buf)
        self._buffers[address] = buf
        return address

    def WintunReleaseReceivePacket(self, session: int, pointer: int) -> None:
        self.released.append(pointer)
        del self._buffers[pointer]

    def WintunAllocateSendPacket(self, session: int, size: int) -> int:
        if self.ring_full:
            return 0
        buf = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buf)
        self._buffers[address] = (buf, size)
        return address

    def WintunSendPacket(self, session: int, pointer: int) -> None:
        buf, size = self._buffers.pop(pointer)
        self.sent.append(buf.raw[:size])

    def WintunEndSession(self, session: int) -> None:
        self.calls.append("end")

    def WintunCloseAdapter(self, adapter: int) -> None:
        self.calls.append("close")


@pytest.mark.anyio
async def test_wintun_device_moves_packets_through_the_dll() -> None:
    dll = FakeWintun()
    waits: list[tuple[object, int]] = []
    device = WintunDevice(
        dll, "ostp0", wait=lambda h, ms: waits.append((h, ms)), last_error=lambda: 259
    )
    dll.inbox += [b"\x45packet-one", b"\x60packet-two"]
    await device.wait_readable()
    assert waits and waits[0][0] == 33
    assert device.read_batch() == [(b"\x45packet-one", False), (b"\x60packet-two", False)]
    assert len(dll.released) == 2 and device.read_batch() == []
    device.write_batch([b"reply-1", b"reply-22"])
    assert dll.sent == [b"reply-1", b"reply-22"]
    dll.ring_full = True
    device.write_batch([b"dropped"])
    assert device.write_drops == 1 and len(dll.sent) == 2
    device.close()
    device.close()
    assert dll.calls == ["create ostp0 OSTP", "start", "end", "close"]
    assert device.read_batch() == []


def test_wintun_adapter_failure_is_a_clear_error() -> None:
    with pytest.raises(WintunError, match="WintunCreateAdapter"):
        WintunDevice(FakeWintun(fail_adapter=True), "ostp0", last_error=lambda: 5)


def test_load_wintun_without_the_dll_says_what_to_install() -> None:
    from ostp_client.inbounds.tun.wintun import load_wintun

    with pytest.raises(WintunError, match="wintun"):
        load_wintun("/nonexistent/wintun.dll")


# -- config ------------------------------------------------------------------------------------


def test_tun_config_parses_with_defaults_and_rejects_bad_values() -> None:
    text = """{"inbounds": [{"type": "tun", "tag": "tun-in", "name": "ostp0", "mtu": 9000,
      "address": ["198.18.0.1/30", "fdfe:dcba:9876::1/126"], "auto_route": true,
      "dns_hijack": true}], "outbounds": [{"type": "direct"}]}"""
    config, _ = parse_config_text(text)
    tun = config.inbounds[0]
    assert tun.type == "tun" and tun.mtu == 9000 and tun.fake_ip is False
    assert (tun.route_table, tun.routing_mark) == (2022, 0x2022)
    marked, _ = parse_config_text(
        '{"inbounds": [{"type": "tun", "route_table": 100, "routing_mark": "0x51"}],'
        ' "outbounds": [{"type": "direct", "routing_mark": 81}]}'
    )
    tun2, direct = marked.inbounds[0], marked.outbounds[0]
    assert isinstance(tun2, TunInboundConfig) and isinstance(direct, DirectOutboundConfig)
    assert (tun2.route_table, tun2.routing_mark, direct.routing_mark) == (100, 0x51, 81)
    for bad, where in (
        ('"name": "a-name-longer-than-15"', "inbounds[0].name"),
        ('"mtu": 500', "inbounds[0].mtu"),
        ('"address": ["198.18.0.1/33"]', "inbounds[0].address[0]"),
        ('"exclude_routes": ["nope"]', "inbounds[0].exclude_routes[0]"),
        ('"fake_ip_range": "10.0.0.0/30"', "inbounds[0].fake_ip_range"),
        ('"dns_upstream": "[bad"', "inbounds[0].dns_upstream"),
        ('"auto_rout": true', "inbounds[0].auto_rout"),
        ('"route_table": 254', "inbounds[0].route_table"),
        ('"route_table": 0', "inbounds[0].route_table"),
        ('"routing_mark": "mark"', "inbounds[0].routing_mark"),
        ('"routing_mark": 4294967296', "inbounds[0].routing_mark"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config_text(
                '{"inbounds": [{"type": "tun", ' + bad + '}], "outbounds": [{"type": "direct"}]}'
            )
        if where is not None:
            assert info.value.issues[0].path == where, info.value


def test_inbound_registers_and_maps_fake_ips() -> None:
    from ostp_client.connections import ConnectionRegistry, Dispatcher
    from ostp_client.flow import Address
    from ostp_client.inbounds import INBOUND_FACTORIES, build_inbound
    from ostp_client.inbounds.tun.inbound import TunInbound
    from ostp_client.outbounds.direct import DirectOutbound
    from ostp_client.router import Router
    from ostp_netstack import Endpoint

    config = TunInboundConfig(fake_ip=True, dns_upstream="192.0.2.53")
    parsed, _ = parse_config_text('{"outbounds": [{"type": "direct"}]}')
    outbounds = {"direct": DirectOutbound()}
    dispatcher = Dispatcher(Router(parsed.routing, outbounds), outbounds, ConnectionRegistry())
    inbound = build_inbound(config, dispatcher)
    assert "tun" in INBOUND_FACTORIES and isinstance(inbound, TunInbound)
    assert inbound.dns_upstream is not None and inbound.dns_upstream.port == 53
    assert inbound.fake_ips is not None
    fake = inbound.fake_ips.address_for("example.test")
    assert inbound._target(Endpoint(str(fake), 443)) == Address("example.test", 443)
    assert inbound._target(Endpoint("198.18.200.200", 80)) is None  # stale fake IP: refused
    assert inbound._target(Endpoint("198.18.0.1", 80)) is not None  # the TUN's own address
    assert inbound.status().type == "tun"
