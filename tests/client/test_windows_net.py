"""Windows TUN configuration (`tun.windows_net`) and socket pinning (`tun.bypass`), on Linux.

The real code path (`WindowsRouteManager` → `IpHelper` → ctypes structures) runs against a fake
iphlpapi.dll that keeps an interface list, addresses and a route table in memory and records
every call. The fake reads and writes the structures by raw byte offsets taken from
wireguard-windows' winipcfg layout tests, not through this package's ctypes classes, so a wrong
field layout shows up as wrong decoded values.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_client.inbounds.tun.windows_net import (
    IP_ADDRESS_PREFIX,
    MIB_IPFORWARD_ROW2,
    MIB_IPINTERFACE_ROW,
    MIB_UNICASTIPADDRESS_ROW,
    SOCKADDR_INET,
    IpHelper,
    IpHelperError,
    Route,
    WindowsRouteManager,
    load_iphlpapi,
)
from ostp_client.inbounds.tun.wintun import WintunDevice
from ostp_client.net import bypass

from .test_tun_units import FakeWintun

AF_INET, AF_INET6 = 2, 23
TUN_LUID, TUN_INDEX, WIFI = 0x0006_0000_0100_0000, 42, 7
ADDRESSES = ["198.18.0.1/30", "fdfe:dcba:9876::1/126"]
SERVERS = ["203.0.113.7/32", "2001:db8:5::7/128"]


# -- raw layout helpers (offsets from wireguard-windows tunnel/winipcfg/types_test*.go) ----------


def _raw(obj: Any) -> Any:
    return (ctypes.c_char * ctypes.sizeof(obj)).from_buffer(obj)


def _get_sockaddr(raw: Any, offset: int) -> str:
    family = struct.unpack_from("<H", raw, offset)[0]
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[offset + 4 : offset + 8])))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[offset + 8 : offset + 24])))
    raise AssertionError(f"bad family {family} at {offset}")


def _put_sockaddr(raw: Any, offset: int, address: str) -> None:
    ip = ipaddress.ip_address(address)
    raw[offset : offset + 28] = bytes(28)
    if ip.version == 4:
        struct.pack_into("<H", raw, offset, AF_INET)
        raw[offset + 4 : offset + 8] = ip.packed
    else:
        struct.pack_into("<H", raw, offset, AF_INET6)
        raw[offset + 8 : offset + 24] = ip.packed


def _decode_route(raw: Any) -> tuple[str, int, str, int]:
    """(prefix, interface index, next hop, metric) of a raw MIB_IPFORWARD_ROW2."""
    index = struct.unpack_from("<I", raw, 8)[0]
    prefix = f"{_get_sockaddr(raw, 12)}/{raw[12 + 28][0]}"
    return (prefix, index, _get_sockaddr(raw, 44), struct.unpack_from("<I", raw, 84)[0])


def _encode_route(raw: Any, route: tuple[str, int, str, int]) -> None:
    prefix, index, hop, metric = route
    network = ipaddress.ip_network(prefix)
    struct.pack_into("<I", raw, 8, index)
    _put_sockaddr(raw, 12, str(network.network_address))
    raw[12 + 28] = bytes([network.prefixlen])
    _put_sockaddr(raw, 44, hop)
    struct.pack_into("<I", raw, 84, metric)


class FakeIpHelperDll:
    """iphlpapi.dll's functions used by `IpHelper`, over an in-memory network configuration."""

    def __init__(self) -> None:
        on4, on6 = "0.0.0.0", "::"
        self.table: list[tuple[str, int, str, int]] = [
            ("0.0.0.0/0", WIFI, "192.168.1.1", 25),
            ("192.168.1.0/24", WIFI, on4, 25),
            ("::/0", WIFI, "fe80::1", 25),
            ("2001:db8:1::/64", WIFI, on6, 25),
        ]
        self.luids = {TUN_LUID: TUN_INDEX}
        self.interfaces: dict[tuple[int, int], dict[str, int]] = {
            (index, family): {"mtu": 1500, "metric": 25, "auto": 1}
            for index in (WIFI, TUN_INDEX)
            for family in (AF_INET, AF_INET6)
        }
        self.addresses: list[tuple[int, str, int]] = []
        self.calls: list[tuple[object, ...]] = []
        self.fail_route: str | None = None
        self._tables: dict[int, Any] = {}

    # routes
    def InitializeIpForwardEntry(self, ref: Any) -> None:
        ctypes.memset(ctypes.addressof(ref._obj), 0, 104)
        struct.pack_into("<II", _raw(ref._obj), 76, 0xFFFFFFFF, 0xFFFFFFFF)  # lifetimes
        struct.pack_into("<I", _raw(ref._obj), 84, 0xFFFFFFFF)  # metric: "default"

    def CreateIpForwardEntry2(self, ref: Any) -> int:
        route = _decode_route(_raw(ref._obj))
        self.calls.append(("add_route", *route))
        if route[0] == self.fail_route:
            return 87  # ERROR_INVALID_PARAMETER
        if any(r[:3] == route[:3] for r in self.table):
            return 5010
        self.table.append(route)
        return 0

    def DeleteIpForwardEntry2(self, ref: Any) -> int:
        route = _decode_route(_raw(ref._obj))
        self.calls.append(("delete_route", *route[:3]))
        for existing in self.table:
            if existing[:3] == route[:3]:
                self.table.remove(existing)
                return 0
        return 1168

    def GetIpForwardTable2(self, family: int, ref: Any) -> int:
        self.calls.append(("table", family))
        version = 4 if family == AF_INET else 6
        rows = [r for r in self.table if ipaddress.ip_network(r[0]).version == version]
        buffer = ctypes.create_string_buffer(8 + 104 * max(1, len(rows)))
        struct.pack_into("<I", buffer, 0, len(rows))
        for i, route in enumerate(rows):
            view = (ctypes.c_char * 104).from_buffer(buffer, 8 + 104 * i)
            _encode_route(view, route)
        self._tables[ctypes.addressof(buffer)] = buffer
        ref._obj.value = ctypes.addressof(buffer)
        return 0

    def FreeMibTable(self, pointer: Any) -> None:
        del self._tables[pointer.value]

    def lookup(self, address: str) -> tuple[str, int, str, int] | None:
        ip = ipaddress.ip_address(address)
        matches = [r for r in self.table if ip in ipaddress.ip_network(r[0])]
        if not matches:
            return None
        return max(matches, key=lambda r: (ipaddress.ip_network(r[0]).prefixlen, -r[3]))

    def GetBestRoute2(
        self, luid: Any, index: int, src: Any, dst: Any, options: int, best: Any, best_src: Any
    ) -> int:
        assert luid is None and index == 0 and src is None and options == 0
        destination = _get_sockaddr(_raw(dst._obj), 0)
        self.calls.append(("best_route", destination))
        route = self.lookup(destination)
        if route is None:
            return 1232  # ERROR_NETWORK_UNREACHABLE
        _encode_route(_raw(best._obj), route)
        return 0

    def ConvertInterfaceLuidToIndex(self, luid: Any, index: Any) -> int:
        if luid._obj.value not in self.luids:
            return 2
        index._obj.value = self.luids[luid._obj.value]
        return 0

    # addresses
    def InitializeUnicastIpAddressEntry(self, ref: Any) -> None:
        ctypes.memset(ctypes.addressof(ref._obj), 0, 80)

    def CreateUnicastIpAddressEntry(self, ref: Any) -> int:
        raw = _raw(ref._obj)
        index = struct.unpack_from("<I", raw, 40)[0]
        entry = (
            index,
            f"{_get_sockaddr(raw, 0)}/{raw[60][0]}",
            struct.unpack_from("<i", raw, 64)[0],
        )
        self.calls.append(("add_address", *entry))
        if any(a[:2] == entry[:2] for a in self.addresses):
            return 5010
        self.addresses.append(entry)
        return 0

    # interfaces
    def InitializeIpInterfaceEntry(self, ref: Any) -> None:
        ctypes.memset(ctypes.addressof(ref._obj), 0, 168)

    def GetIpInterfaceEntry(self, ref: Any) -> int:
        raw = _raw(ref._obj)
        family, index = struct.unpack_from("<H", raw, 0)[0], struct.unpack_from("<I", raw, 16)[0]
        settings = self.interfaces.get((index, family))
        if settings is None:
            return 1168
        raw[44] = bytes([settings["auto"]])
        struct.pack_into(
            "<III", raw, 144, 64 if family == AF_INET else 0, settings["metric"], settings["mtu"]
        )
        return 0

    def SetIpInterfaceEntry(self, ref: Any) -> int:
        raw = _raw(ref._obj)
        family, index = struct.unpack_from("<H", raw, 0)[0], struct.unpack_from("<I", raw, 16)[0]
        site, metric, mtu = struct.unpack_from("<III", raw, 144)
        self.calls.append(("set_interface", index, family, mtu, metric, raw[44][0]))
        if family == AF_INET and site != 0:
            return 87  # what Windows answers (wireguard-windows zeroes it for this reason)
        self.interfaces[(index, family)] = {"mtu": mtu, "metric": metric, "auto": raw[44][0]}
        return 0


@pytest.fixture(autouse=True)
def _no_pinning_left() -> Iterator[None]:
    yield
    bypass.clear_unicast_interface()


def _manager(
    tmp_path: Path, dll: FakeIpHelperDll | None = None
) -> tuple[WindowsRouteManager, FakeIpHelperDll]:
    dll = dll or FakeIpHelperDll()
    fake_wintun = LuidWintun()
    device = WintunDevice(fake_wintun, "ostp0", wait=lambda h, ms: None, last_error=lambda: 0)
    manager = device.route_manager(IpHelper(dll), state_path=tmp_path / "tun-routes.json")
    return manager, dll


class LuidWintun(FakeWintun):
    def WintunGetAdapterLUID(self, adapter: int, ref: Any) -> None:
        assert adapter == 11
        ref._obj.value = TUN_LUID


# -- layout ------------------------------------------------------------------------------------


def test_structures_have_the_windows_x64_layout() -> None:
    assert ctypes.sizeof(SOCKADDR_INET) == 28
    assert (ctypes.sizeof(IP_ADDRESS_PREFIX), IP_ADDRESS_PREFIX.PrefixLength.offset) == (32, 28)
    row = MIB_IPFORWARD_ROW2
    assert ctypes.sizeof(row) == 104
    assert [
        row.InterfaceIndex.offset,
        row.DestinationPrefix.offset,
        row.NextHop.offset,
        row.SitePrefixLength.offset,
        row.Metric.offset,
        row.Protocol.offset,
        row.Loopback.offset,
        row.Age.offset,
        row.Origin.offset,
    ] == [8, 12, 44, 72, 84, 88, 92, 96, 100]
    address = MIB_UNICASTIPADDRESS_ROW
    assert ctypes.sizeof(address) == 80
    assert [
        address.InterfaceLuid.offset,
        address.InterfaceIndex.offset,
        address.OnLinkPrefixLength.offset,
        address.SkipAsSource.offset,
        address.DadState.offset,
        address.CreationTimeStamp.offset,
    ] == [32, 40, 60, 61, 64, 72]
    interface = MIB_IPINTERFACE_ROW
    assert ctypes.sizeof(interface) == 168
    assert [
        interface.InterfaceLuid.offset,
        interface.InterfaceIndex.offset,
        interface.UseAutomaticMetric.offset,
        interface.RouterDiscoveryBehavior.offset,
        interface.ZoneIndices.offset,
        interface.SitePrefixLength.offset,
        interface.Metric.offset,
        interface.NlMtu.offset,
        interface.Connected.offset,
        interface.ReachableTime.offset,
        interface.DisableDefaultRoutes.offset,
    ] == [8, 16, 44, 52, 80, 144, 148, 152, 156, 160, 166]


def test_load_iphlpapi_off_windows_is_a_clear_error() -> None:
    with pytest.raises(IpHelperError, match="iphlpapi"):
        load_iphlpapi()


# -- the whole auto_route path -------------------------------------------------------------------


TUN_ROUTE_CALLS = [
    ("add_route", "0.0.0.0/1", TUN_INDEX, "0.0.0.0", 0),
    ("add_route", "128.0.0.0/1", TUN_INDEX, "0.0.0.0", 0),
    ("add_route", "::/1", TUN_INDEX, "::", 0),
    ("add_route", "8000::/1", TUN_INDEX, "::", 0),
]


def test_auto_route_issues_exact_calls_and_restore_reverses_them(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    original = list(dll.table)
    assert manager.if_index == TUN_INDEX
    manager.configure(9000, ADDRESSES)
    assert manager.clean_stale() == 0
    manager.install_policy(2022, 0x2022, [*SERVERS, "10.0.0.0/8", "203.0.113.7"])
    manager.add_device_routes(["198.18.0.0/15", "fc00::/18"])
    assert dll.calls == [
        ("set_interface", TUN_INDEX, AF_INET, 9000, 0, 0),
        ("set_interface", TUN_INDEX, AF_INET6, 9000, 0, 0),
        ("add_address", TUN_INDEX, "198.18.0.1/30", 4),  # DadState preferred: no DAD
        ("add_address", TUN_INDEX, "fdfe:dcba:9876::1/126", 4),
        # the physical interface for the daemon's sockets, before any route changes
        ("best_route", "1.1.1.1"),
        ("best_route", "2606:4700:4700::1111"),
        # exclusions via the original next hop, before the TUN takes the default
        ("best_route", "203.0.113.7"),
        ("best_route", "2001:db8:5::7"),
        ("best_route", "10.0.0.0"),
        ("add_route", "203.0.113.7/32", WIFI, "192.168.1.1", 0),
        ("add_route", "2001:db8:5::7/128", WIFI, "fe80::1", 0),
        ("add_route", "10.0.0.0/8", WIFI, "192.168.1.1", 0),
        *TUN_ROUTE_CALLS,
        ("add_route", "198.18.0.0/15", TUN_INDEX, "0.0.0.0", 0),
        ("add_route", "fc00::/18", TUN_INDEX, "::", 0),
    ]
    assert dll.interfaces[(TUN_INDEX, AF_INET)] == {"mtu": 9000, "metric": 0, "auto": 0}
    assert bypass.unicast_interface() == (WIFI, WIFI)
    state = json.loads((tmp_path / "tun-routes.json").read_text())
    assert [r["prefix"] for r in state["routes"]] == [
        "203.0.113.7/32",
        "2001:db8:5::7/128",
        "10.0.0.0/8",
        "0.0.0.0/1",
        "128.0.0.0/1",
        "::/1",
        "8000::/1",
        "198.18.0.0/15",
        "fc00::/18",
    ]

    # nothing leaks: the servers and exclusions go out directly, everything else into the TUN
    assert dll.lookup("203.0.113.7") == ("203.0.113.7/32", WIFI, "192.168.1.1", 0)
    assert dll.lookup("2001:db8:5::7") == ("2001:db8:5::7/128", WIFI, "fe80::1", 0)
    assert dll.lookup("10.1.2.3")[1:3] == (WIFI, "192.168.1.1")  # type: ignore[index]
    assert dll.lookup("192.168.1.20")[1] == WIFI  # type: ignore[index]  # the LAN stays local
    for address in ("8.8.8.8", "203.0.113.8", "200.1.1.1", "2a00:1450::1", "fe00::1", "::1:2"):
        assert dll.lookup(address)[1] == TUN_INDEX, address  # type: ignore[index]

    dll.calls.clear()
    manager.restore()
    assert dll.calls == [
        ("delete_route", "fc00::/18", TUN_INDEX, "::"),
        ("delete_route", "198.18.0.0/15", TUN_INDEX, "0.0.0.0"),
        ("delete_route", "8000::/1", TUN_INDEX, "::"),
        ("delete_route", "::/1", TUN_INDEX, "::"),
        ("delete_route", "128.0.0.0/1", TUN_INDEX, "0.0.0.0"),
        ("delete_route", "0.0.0.0/1", TUN_INDEX, "0.0.0.0"),
        ("delete_route", "10.0.0.0/8", WIFI, "192.168.1.1"),
        ("delete_route", "2001:db8:5::7/128", WIFI, "fe80::1"),
        ("delete_route", "203.0.113.7/32", WIFI, "192.168.1.1"),
    ]
    assert dll.table == original
    assert bypass.unicast_interface() is None
    assert not (tmp_path / "tun-routes.json").exists()
    manager.restore()  # idempotent
    assert dll.table == original


@given(st.ip_addresses())
@settings(max_examples=300)
def test_with_auto_route_every_address_but_the_excluded_goes_into_the_tun(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    dll = FakeIpHelperDll()
    manager = WindowsRouteManager(IpHelper(dll), TUN_INDEX, state_path=Path("/nonexistent/x"))
    manager.applied = []
    excluded = [ipaddress.ip_network(s) for s in SERVERS]
    local = [ipaddress.ip_network(r[0]) for r in dll.table if r[0] not in ("0.0.0.0/0", "::/0")]
    for route in manager.plan_exclusions(SERVERS):
        dll.table.append((str(route.prefix), route.if_index, str(route.next_hop), 0))
    for network in ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"):
        dll.table.append((network, TUN_INDEX, "::" if ":" in network else "0.0.0.0", 0))
    best = dll.lookup(str(address))
    assert best is not None
    if any(address in n for n in excluded + local):
        assert best[1] == WIFI
    else:
        assert best[1] == TUN_INDEX


def test_a_crashed_runs_routes_are_removed_at_the_next_start(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    manager.configure(1500, ADDRESSES)
    manager.install_policy(excludes=SERVERS)
    ours = [r for r in dll.table if r[1] == TUN_INDEX or r[0] in SERVERS]
    assert len(ours) == 6
    # the process dies: nothing restored. Windows drops the adapter with its routes; the server
    # routes on the physical interface stay. Someone also added a route of their own.
    dll.table = [r for r in dll.table if r[1] != TUN_INDEX]
    dll.table.append(("203.0.113.0/24", WIFI, "192.168.1.254", 5))
    bypass.clear_unicast_interface()
    dll.calls.clear()

    again, _ = _manager(tmp_path, dll)
    assert again.clean_stale(2022) == 2
    deletions = [c for c in dll.calls if c[0] == "delete_route"]
    assert deletions == [
        ("delete_route", "2001:db8:5::7/128", WIFI, "fe80::1"),
        ("delete_route", "203.0.113.7/32", WIFI, "192.168.1.1"),
    ]
    assert ("203.0.113.0/24", WIFI, "192.168.1.254", 5) in dll.table
    assert not (tmp_path / "tun-routes.json").exists()
    assert again.clean_stale() == 0


def test_unreadable_state_is_ignored(tmp_path: Path) -> None:
    manager, _ = _manager(tmp_path)
    (tmp_path / "tun-routes.json").write_text("{not json")
    assert manager.clean_stale() == 0
    assert not (tmp_path / "tun-routes.json").exists()


def test_a_failed_route_undoes_everything_and_raises(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    original = list(dll.table)
    dll.fail_route = "::/1"
    with pytest.raises(IpHelperError, match="CreateIpForwardEntry2"):
        manager.install_policy(excludes=SERVERS)
    assert dll.table == original
    assert bypass.unicast_interface() is None
    assert not (tmp_path / "tun-routes.json").exists()


def test_existing_routes_are_not_taken_over(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    manager.install_policy(excludes=["192.168.1.0/24"])  # the LAN route itself
    assert ("192.168.1.0/24", WIFI, "0.0.0.0", 25) in dll.table
    assert all(r.prefix != ipaddress.ip_network("192.168.1.0/24") for r in manager.applied)
    manager.restore()
    assert ("192.168.1.0/24", WIFI, "0.0.0.0", 25) in dll.table


def test_unreachable_exclusions_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager, dll = _manager(tmp_path)
    dll.table = [r for r in dll.table if ":" not in r[0]]  # no IPv6 connectivity at all
    manager.install_policy(excludes=SERVERS)
    assert "2001:db8:5::7/128 has no route outside the TUN" in caplog.text
    assert bypass.unicast_interface() == (WIFI, None)
    assert {r[0] for r in dll.table if r[1] == TUN_INDEX} == {
        "0.0.0.0/1",
        "128.0.0.0/1",
        "::/1",
        "8000::/1",
    }  # IPv6 still goes into the TUN rather than nowhere in particular
    manager.restore()
    # with no IPv6 anywhere, an adapter that refuses IPv6 routes does not stop auto_route...
    dll.fail_route = "::/1"
    manager.install_policy(excludes=SERVERS)
    tun = {r[0] for r in dll.table if r[1] == TUN_INDEX}
    assert tun == {"0.0.0.0/1", "128.0.0.0/1", "8000::/1"}
    assert "no IPv6 route into the TUN" in caplog.text
    manager.restore()


def test_ipv6_routes_are_required_when_the_system_has_ipv6(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    original = list(dll.table)
    dll.fail_route = "8000::/1"  # ...but with IPv6 outside, IPv6 would leak: refuse to run
    with pytest.raises(IpHelperError):
        manager.install_policy(excludes=SERVERS)
    assert dll.table == original


def test_ipv4_site_prefix_length_is_cleared_before_setting_the_interface(tmp_path: Path) -> None:
    manager, dll = _manager(tmp_path)
    manager.configure(1280, ["198.18.0.1/30"])  # the fake refuses a non-zero one, like Windows
    assert dll.interfaces[(TUN_INDEX, AF_INET)]["mtu"] == 1280
    manager.configure(1280, ["198.18.0.1/30"])  # address exists already: fine
    assert dll.addresses == [(TUN_INDEX, "198.18.0.1/30", 4)]


def test_routes_round_trip_through_the_table_reader() -> None:
    dll = FakeIpHelperDll()
    api = IpHelper(dll)
    assert api.routes(4) == [
        Route(ipaddress.ip_network("0.0.0.0/0"), WIFI, ipaddress.ip_address("192.168.1.1"), 25),
        Route(ipaddress.ip_network("192.168.1.0/24"), WIFI, ipaddress.ip_address("0.0.0.0"), 25),
    ]
    assert [str(r.next_hop) for r in api.routes(6)] == ["fe80::1", "::"]
    assert dll._tables == {}  # every table was freed
    with pytest.raises(FileNotFoundError):
        api.luid_to_index(12345)


# -- sockets pinned to the physical interface ------------------------------------------------


class FakeSocket:
    def __init__(self, family: int, refuse: tuple[int, int] | None = None) -> None:
        self.family = family
        self.refuse = refuse
        self.options: list[tuple[int, int, int | bytes]] = []

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None:
        if (level, option) == self.refuse:
            raise OSError(10022, "An invalid argument was supplied")
        self.options.append((level, option, value))


def test_unicast_interface_options_on_ipv4_and_dual_stack_sockets() -> None:
    bypass.set_unicast_interface(7, 300)
    v4 = FakeSocket(socket.AF_INET)
    assert bypass.apply_bypass(v4, 0x2022) is True  # type: ignore[arg-type]
    assert v4.options == [(0, 31, b"\x00\x00\x00\x07")]  # IP_UNICAST_IF: network byte order
    v6 = FakeSocket(socket.AF_INET6)
    assert bypass.apply_bypass(v6) is True  # type: ignore[arg-type]
    assert v6.options == [(41, 31, struct.pack("=I", 300)), (0, 31, b"\x00\x00\x00\x07")]
    v6only = FakeSocket(socket.AF_INET6, refuse=(0, 31))
    assert bypass.apply_bypass(v6only) is True  # type: ignore[arg-type]
    assert v6only.options == [(41, 31, struct.pack("=I", 300))]
    with pytest.raises(bypass.BypassError, match="pin"):
        bypass.apply_bypass(FakeSocket(socket.AF_INET, refuse=(0, 31)))  # type: ignore[arg-type]
    bypass.clear_unicast_interface()
    untouched = FakeSocket(socket.AF_INET)
    assert bypass.apply_bypass(untouched) is False  # type: ignore[arg-type]
    assert untouched.options == []


def test_unicast_interface_rejects_bad_indices() -> None:
    with pytest.raises(ValueError, match="index"):
        bypass.set_unicast_interface(0, None)
    bypass.set_unicast_interface(None, 5)
    v4 = FakeSocket(socket.AF_INET)
    assert bypass.apply_unicast_interface(v4) is False and v4.options == []
