"""Windows: the TUN adapter's addresses, MTU and the routes ``auto_route`` installs.

What Linux does with ``ip`` (`ostp_client.inbounds.tun.linux.RouteManager`), done here with the IP
Helper API (iphlpapi.dll through ctypes, as wireguard-windows' ``winipcfg`` does it), because its
calls take and return structures rather than localised text to parse (``netsh`` / ``route print``
output is translated):

- MTU and interface metric: ``GetIpInterfaceEntry`` / ``SetIpInterfaceEntry`` per family;
- addresses: ``CreateUnicastIpAddressEntry`` (DAD skipped: the TUN is the only host on its link);
- routes: ``CreateIpForwardEntry2`` / ``DeleteIpForwardEntry2``, ``GetIpForwardTable2`` to find
  a crashed run's leftovers, ``GetBestRoute2`` for the original next hop of an exclusion.

Windows has no policy routing, so ``auto_route`` works by prefix length and metrics:

1. before anything changes, the best route (``GetBestRoute2``) to each OSTP server and each
   ``exclude_routes`` network is looked up; each becomes a route of its own via that original
   interface and next hop (a host route for a server);
2. the TUN gets ``0.0.0.0/1`` + ``128.0.0.0/1`` and ``::/1`` + ``8000::/1`` (OpenVPN's
   ``def1``): longer than any default route, so they win whatever metric DHCP gave the physical
   interface, while the LAN's own, longer routes and the exclusions of step 1 still win over
   them. The TUN's interface metric is set to the lowest too. IPv6 routes are installed even
   when the TUN has no IPv6 address, so IPv6 cannot go around the tunnel;
3. the daemon's own sockets are pinned to the physical interface with ``IP_UNICAST_IF`` /
   ``IPV6_UNICAST_IF`` (`ostp_client.net.bypass.set_unicast_interface`, as sing-box does for
   its outbound sockets), so a server whose address changes later is still reached directly.

Every route added is first written to a small JSON state file; :meth:`WindowsRouteManager.restore`
deletes them in reverse order and then the file. A run that crashed leaves the file behind, and
the next start (:meth:`WindowsRouteManager.clean_stale`) deletes exactly the routes it lists that
are still in the table. Routes and addresses on the Wintun adapter itself disappear with the
adapter; the file matters for the exclusions, which live on the physical interface.

Everything goes through a `NetConfigApi`; `IpHelper` is the real one over a ``dll`` object, so
the tests run this code against a fake iphlpapi that keeps a route table in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ostp_client.errors import OstpClientError
from ostp_client.net import bypass

__all__ = [
    "IpHelper",
    "IpHelperError",
    "NetConfigApi",
    "Route",
    "WindowsRouteManager",
    "default_state_path",
    "load_iphlpapi",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# ws2def.h
AF_UNSPEC = 0
AF_INET = 2
AF_INET6 = 23
_AF = {4: AF_INET, 6: AF_INET6}
# winerror.h
NO_ERROR = 0
ERROR_FILE_NOT_FOUND = 2
ERROR_NOT_FOUND = 1168
ERROR_OBJECT_ALREADY_EXISTS = 5010
# nldef.h
NL_DAD_STATE_PREFERRED = 4  # IpDadStatePreferred: skip duplicate address detection
INFINITE_LIFETIME = 0xFFFFFFFF

TUN_INTERFACE_METRIC = 0
"""The lowest interface metric: with route metric 0 the TUN's routes cost least."""
TUN_ROUTES = {
    4: (ipaddress.ip_network("0.0.0.0/1"), ipaddress.ip_network("128.0.0.0/1")),
    6: (ipaddress.ip_network("::/1"), ipaddress.ip_network("8000::/1")),
}
"""Two halves per family (OpenVPN's def1): longer than any default route, shorter than all else."""
PROBES: dict[int, IPAddress] = {
    4: ipaddress.IPv4Address("1.1.1.1"),
    6: ipaddress.IPv6Address("2606:4700:4700::1111"),
}
"""Addresses whose best route (a lookup only, nothing is sent) names the physical interface."""
STATE_VERSION = 1


class IpHelperError(OstpClientError, OSError):
    """An IP Helper call failed (``errno`` holds its Win32 error code)."""


# --------------------------------------------------------------------------------------------
# the interface


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the IP forwarding table, in the terms ``MIB_IPFORWARD_ROW2`` uses."""

    prefix: IPNetwork
    if_index: int
    next_hop: IPAddress
    """The gateway; the family's unspecified address (``0.0.0.0``, ``::``) means on-link."""
    metric: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "prefix": str(self.prefix),
            "if_index": self.if_index,
            "next_hop": str(self.next_hop),
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        return cls(
            ipaddress.ip_network(str(data["prefix"])),
            int(data["if_index"]),
            ipaddress.ip_address(str(data["next_hop"])),
            int(data.get("metric", 0)),
        )

    def same_entry(self, other: Route) -> bool:
        """The key Windows uses for a route: prefix, interface, next hop (not the metric)."""
        return (self.prefix, self.if_index, self.next_hop) == (
            other.prefix,
            other.if_index,
            other.next_hop,
        )


def on_link(version: int) -> IPAddress:
    return ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)


class NetConfigApi(Protocol):
    """The network configuration calls `WindowsRouteManager` needs (IP Helper's semantics)."""

    def luid_to_index(self, luid: int) -> int: ...

    def set_interface(self, if_index: int, version: int, *, mtu: int, metric: int) -> None:
        """Set the interface's MTU and a fixed metric for one family."""

    def add_address(self, if_index: int, address: IPInterface) -> None:
        """Add a unicast address; `FileExistsError` when it is already there."""

    def add_route(self, route: Route) -> None:
        """Add a route; `FileExistsError` when the same entry exists."""

    def delete_route(self, route: Route) -> None:
        """Delete a route; `FileNotFoundError` when there is no such entry."""

    def best_route(self, destination: IPAddress) -> Route | None:
        """The route the system would use for ``destination`` now (None: unreachable)."""

    def routes(self, version: int) -> list[Route]:
        """The whole forwarding table of one family."""


# --------------------------------------------------------------------------------------------
# IP Helper structures (netioapi.h, ws2ipdef.h); fixed-width types only, so that the layout
# computed on any 64-bit host is the Windows x64 one (checked against wireguard-windows'
# winipcfg sizes in the tests)


class SOCKADDR_IN(ctypes.Structure):
    _fields_ = (
        ("sin_family", ctypes.c_uint16),
        ("sin_port", ctypes.c_uint16),
        ("sin_addr", ctypes.c_ubyte * 4),
        ("sin_zero", ctypes.c_ubyte * 8),
    )


class SOCKADDR_IN6(ctypes.Structure):
    _fields_ = (
        ("sin6_family", ctypes.c_uint16),
        ("sin6_port", ctypes.c_uint16),
        ("sin6_flowinfo", ctypes.c_uint32),
        ("sin6_addr", ctypes.c_ubyte * 16),
        ("sin6_scope_id", ctypes.c_uint32),
    )


class SOCKADDR_INET(ctypes.Union):
    _fields_ = (("Ipv4", SOCKADDR_IN), ("Ipv6", SOCKADDR_IN6), ("si_family", ctypes.c_uint16))


class IP_ADDRESS_PREFIX(ctypes.Structure):
    _fields_ = (("Prefix", SOCKADDR_INET), ("PrefixLength", ctypes.c_uint8))


class MIB_IPFORWARD_ROW2(ctypes.Structure):
    _fields_ = (
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("DestinationPrefix", IP_ADDRESS_PREFIX),
        ("NextHop", SOCKADDR_INET),
        ("SitePrefixLength", ctypes.c_uint8),
        ("ValidLifetime", ctypes.c_uint32),
        ("PreferredLifetime", ctypes.c_uint32),
        ("Metric", ctypes.c_uint32),
        ("Protocol", ctypes.c_int32),
        ("Loopback", ctypes.c_uint8),
        ("AutoconfigureAddress", ctypes.c_uint8),
        ("Publish", ctypes.c_uint8),
        ("Immortal", ctypes.c_uint8),
        ("Age", ctypes.c_uint32),
        ("Origin", ctypes.c_int32),
    )


class MIB_UNICASTIPADDRESS_ROW(ctypes.Structure):
    _fields_ = (
        ("Address", SOCKADDR_INET),
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("PrefixOrigin", ctypes.c_int32),
        ("SuffixOrigin", ctypes.c_int32),
        ("ValidLifetime", ctypes.c_uint32),
        ("PreferredLifetime", ctypes.c_uint32),
        ("OnLinkPrefixLength", ctypes.c_uint8),
        ("SkipAsSource", ctypes.c_uint8),
        ("DadState", ctypes.c_int32),
        ("ScopeId", ctypes.c_uint32),
        ("CreationTimeStamp", ctypes.c_int64),
    )


class MIB_IPINTERFACE_ROW(ctypes.Structure):
    _fields_ = (
        ("Family", ctypes.c_uint16),
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("MaxReassemblySize", ctypes.c_uint32),
        ("InterfaceIdentifier", ctypes.c_uint64),
        ("MinRouterAdvertisementInterval", ctypes.c_uint32),
        ("MaxRouterAdvertisementInterval", ctypes.c_uint32),
        ("AdvertisingEnabled", ctypes.c_uint8),
        ("ForwardingEnabled", ctypes.c_uint8),
        ("WeakHostSend", ctypes.c_uint8),
        ("WeakHostReceive", ctypes.c_uint8),
        ("UseAutomaticMetric", ctypes.c_uint8),
        ("UseNeighborUnreachabilityDetection", ctypes.c_uint8),
        ("ManagedAddressConfigurationSupported", ctypes.c_uint8),
        ("OtherStatefulConfigurationSupported", ctypes.c_uint8),
        ("AdvertiseDefaultRoute", ctypes.c_uint8),
        ("RouterDiscoveryBehavior", ctypes.c_int32),
        ("DadTransmits", ctypes.c_uint32),
        ("BaseReachableTime", ctypes.c_uint32),
        ("RetransmitTime", ctypes.c_uint32),
        ("PathMtuDiscoveryTimeout", ctypes.c_uint32),
        ("LinkLocalAddressBehavior", ctypes.c_int32),
        ("LinkLocalAddressTimeout", ctypes.c_uint32),
        ("ZoneIndices", ctypes.c_uint32 * 16),
        ("SitePrefixLength", ctypes.c_uint32),
        ("Metric", ctypes.c_uint32),
        ("NlMtu", ctypes.c_uint32),
        ("Connected", ctypes.c_uint8),
        ("SupportsWakeUpPatterns", ctypes.c_uint8),
        ("SupportsNeighborDiscovery", ctypes.c_uint8),
        ("SupportsRouterDiscovery", ctypes.c_uint8),
        ("ReachableTime", ctypes.c_uint32),
        ("TransmitOffload", ctypes.c_uint8),
        ("ReceiveOffload", ctypes.c_uint8),
        ("DisableDefaultRoutes", ctypes.c_uint8),
    )


MIB_TABLE_ROWS_OFFSET = 8
"""``MIB_*_TABLE2``: ``ULONG NumEntries`` then the rows, aligned to 8 (their LUIDs)."""


def sockaddr_from(address: IPAddress) -> SOCKADDR_INET:
    out = SOCKADDR_INET()
    if address.version == 4:
        out.Ipv4.sin_family = AF_INET
        out.Ipv4.sin_addr[:] = list(address.packed)
    else:
        out.Ipv6.sin6_family = AF_INET6
        out.Ipv6.sin6_addr[:] = list(address.packed)
    return out


def address_of(sockaddr: SOCKADDR_INET) -> IPAddress:
    if sockaddr.si_family == AF_INET:
        return ipaddress.IPv4Address(bytes(sockaddr.Ipv4.sin_addr))
    if sockaddr.si_family == AF_INET6:
        return ipaddress.IPv6Address(bytes(sockaddr.Ipv6.sin6_addr))
    raise ValueError(f"not an IP socket address (family {sockaddr.si_family})")


def route_of(row: MIB_IPFORWARD_ROW2) -> Route:
    address = address_of(row.DestinationPrefix.Prefix)
    prefix = ipaddress.ip_network(f"{address}/{row.DestinationPrefix.PrefixLength}", strict=False)
    return Route(prefix, int(row.InterfaceIndex), address_of(row.NextHop), int(row.Metric))


def _check(status: int, what: str) -> None:
    if status == NO_ERROR:
        return
    if status == ERROR_OBJECT_ALREADY_EXISTS:
        raise FileExistsError(status, f"{what}: already exists")
    if status in (ERROR_NOT_FOUND, ERROR_FILE_NOT_FOUND):
        raise FileNotFoundError(status, f"{what}: not found")
    raise IpHelperError(status, f"{what} failed (Win32 error {status})")


def load_iphlpapi() -> Any:  # pragma: no cover - Windows only
    """iphlpapi.dll with the signatures used by `IpHelper` declared."""
    try:
        dll = ctypes.WinDLL("iphlpapi.dll")  # type: ignore[attr-defined,unused-ignore]
    except (OSError, AttributeError) as exc:
        raise IpHelperError(0, f"cannot load iphlpapi.dll (Windows only): {exc}") from exc
    ref = ctypes.c_void_p
    status = ctypes.c_uint32
    for name in (
        "InitializeIpForwardEntry",
        "InitializeUnicastIpAddressEntry",
        "InitializeIpInterfaceEntry",
    ):
        getattr(dll, name).argtypes = [ref]
        getattr(dll, name).restype = None
    for name in (
        "CreateIpForwardEntry2",
        "DeleteIpForwardEntry2",
        "CreateUnicastIpAddressEntry",
        "GetIpInterfaceEntry",
        "SetIpInterfaceEntry",
    ):
        getattr(dll, name).argtypes = [ref]
        getattr(dll, name).restype = status
    dll.GetIpForwardTable2.argtypes = [ctypes.c_uint16, ref]
    dll.GetIpForwardTable2.restype = status
    dll.FreeMibTable.argtypes = [ref]
    dll.FreeMibTable.restype = None
    dll.ConvertInterfaceLuidToIndex.argtypes = [ref, ref]
    dll.ConvertInterfaceLuidToIndex.restype = status
    dll.GetBestRoute2.argtypes = [ref, ctypes.c_uint32, ref, ref, ctypes.c_uint32, ref, ref]
    dll.GetBestRoute2.restype = status
    return dll


class IpHelper:
    """`NetConfigApi` over iphlpapi.dll (or any object with the same functions: the tests')."""

    def __init__(self, dll: Any) -> None:
        self._dll = dll

    def luid_to_index(self, luid: int) -> int:
        value = ctypes.c_uint64(luid)
        index = ctypes.c_uint32()
        _check(
            self._dll.ConvertInterfaceLuidToIndex(ctypes.byref(value), ctypes.byref(index)),
            "ConvertInterfaceLuidToIndex",
        )
        return int(index.value)

    def set_interface(self, if_index: int, version: int, *, mtu: int, metric: int) -> None:
        row = MIB_IPINTERFACE_ROW()
        self._dll.InitializeIpInterfaceEntry(ctypes.byref(row))
        row.Family = _AF[version]
        row.InterfaceIndex = if_index
        _check(
            self._dll.GetIpInterfaceEntry(ctypes.byref(row)), f"GetIpInterfaceEntry(IPv{version})"
        )
        row.NlMtu = mtu
        row.UseAutomaticMetric = 0
        row.Metric = metric
        if version == 4:
            # returned for IPv4 but refused by SetIpInterfaceEntry (wireguard-windows does this)
            row.SitePrefixLength = 0
        _check(
            self._dll.SetIpInterfaceEntry(ctypes.byref(row)), f"SetIpInterfaceEntry(IPv{version})"
        )

    def add_address(self, if_index: int, address: IPInterface) -> None:
        row = MIB_UNICASTIPADDRESS_ROW()
        self._dll.InitializeUnicastIpAddressEntry(ctypes.byref(row))
        row.Address = sockaddr_from(address.ip)
        row.InterfaceIndex = if_index
        row.OnLinkPrefixLength = address.network.prefixlen
        row.DadState = NL_DAD_STATE_PREFERRED
        row.ValidLifetime = row.PreferredLifetime = INFINITE_LIFETIME
        _check(
            self._dll.CreateUnicastIpAddressEntry(ctypes.byref(row)),
            f"CreateUnicastIpAddressEntry({address})",
        )

    def _route_row(self, route: Route) -> MIB_IPFORWARD_ROW2:
        row = MIB_IPFORWARD_ROW2()
        self._dll.InitializeIpForwardEntry(ctypes.byref(row))
        row.InterfaceIndex = route.if_index
        row.DestinationPrefix.Prefix = sockaddr_from(route.prefix.network_address)
        row.DestinationPrefix.PrefixLength = route.prefix.prefixlen
        row.NextHop = sockaddr_from(route.next_hop)
        row.Metric = route.metric
        return row

    def add_route(self, route: Route) -> None:
        row = self._route_row(route)
        _check(
            self._dll.CreateIpForwardEntry2(ctypes.byref(row)),
            f"CreateIpForwardEntry2({route.prefix})",
        )

    def delete_route(self, route: Route) -> None:
        row = self._route_row(route)
        _check(
            self._dll.DeleteIpForwardEntry2(ctypes.byref(row)),
            f"DeleteIpForwardEntry2({route.prefix})",
        )

    def best_route(self, destination: IPAddress) -> Route | None:
        target = sockaddr_from(destination)
        best = MIB_IPFORWARD_ROW2()
        source = SOCKADDR_INET()
        status = self._dll.GetBestRoute2(
            None, 0, None, ctypes.byref(target), 0, ctypes.byref(best), ctypes.byref(source)
        )
        if status != NO_ERROR:
            logger.debug("GetBestRoute2(%s): Win32 error %d", destination, status)
            return None
        return route_of(best)

    def routes(self, version: int) -> list[Route]:
        table = ctypes.c_void_p()
        _check(
            self._dll.GetIpForwardTable2(_AF[version], ctypes.byref(table)), "GetIpForwardTable2"
        )
        try:
            base = table.value or 0
            count = ctypes.c_uint32.from_address(base).value if base else 0
            rows = (MIB_IPFORWARD_ROW2 * count).from_address(base + MIB_TABLE_ROWS_OFFSET)
            out = []
            for row in rows:
                with contextlib.suppress(ValueError):
                    out.append(route_of(row))
            return out
        finally:
            if table.value:
                self._dll.FreeMibTable(table)


# --------------------------------------------------------------------------------------------
# the state file and the manager


def default_state_path() -> Path:
    """``%LOCALAPPDATA%\\ostp-client\\tun-routes.json`` (a per-user directory elsewhere)."""
    base = os.environ.get("LOCALAPPDATA") or os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "ostp-client" / "tun-routes.json"


def _write_state(path: Path, routes: Sequence[Route]) -> None:
    """Atomically (temporary file, then replace); the directory is created owner-only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"version": STATE_VERSION, "routes": [r.to_json() for r in routes]})
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_state(path: Path) -> list[Route]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Route.from_json(item) for item in data["routes"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable route state %s: %s", path, exc)
        return []


@dataclass
class WindowsRouteManager:
    """Configures the Wintun adapter and installs ``auto_route``; :meth:`restore` undoes it.

    The method names match `ostp_client.inbounds.tun.linux.RouteManager`, so the inbound drives
    both the same way; Linux's routing table and mark have no meaning here and are ignored.
    """

    api: NetConfigApi
    if_index: int
    state_path: Path = field(default_factory=default_state_path)
    ipv6: bool = True
    """Install the IPv6 routes (keep True unless the system has no IPv6 stack at all)."""
    applied: list[Route] = field(default_factory=list)
    physical: dict[int, int] = field(default_factory=dict)
    """Interface index per IP version that the daemon's sockets are pinned to."""

    @classmethod
    def for_luid(cls, luid: int, **kwargs: Any) -> WindowsRouteManager:  # pragma: no cover
        api = IpHelper(load_iphlpapi())
        return cls(api, api.luid_to_index(luid), **kwargs)

    def _versions(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def configure(self, mtu: int, addresses: Sequence[str]) -> None:
        """MTU and the lowest metric for each family, then the addresses."""
        for version in self._versions():
            try:
                self.api.set_interface(self.if_index, version, mtu=mtu, metric=TUN_INTERFACE_METRIC)
            except OSError as exc:
                if version == 4:
                    raise
                logger.warning("TUN: IPv6 interface settings not applied: %s", exc)
        for text in addresses:
            address = ipaddress.ip_interface(text)
            try:
                self.api.add_address(self.if_index, address)
            except FileExistsError:
                logger.debug("TUN: %s is already on the adapter", address)

    def clean_stale(self, table: int = 0, priority: int = 0) -> int:
        """Delete the routes a crashed earlier run recorded and left in the table; how many."""
        stale = _read_state(self.state_path)
        removed = 0
        if stale:
            present = {v: self.api.routes(v) for v in {r.prefix.version for r in stale}}
            for route in reversed(stale):
                if any(route.same_entry(p) for p in present[route.prefix.version]):
                    with contextlib.suppress(FileNotFoundError):
                        self.api.delete_route(route)
                        removed += 1
                        logger.warning("removed a stale route: %s", _describe(route))
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return removed

    def _add(self, route: Route) -> bool:
        """Record, then add; a route that exists already is not ours and is left alone."""
        _write_state(self.state_path, [*self.applied, route])
        try:
            self.api.add_route(route)
        except FileExistsError:
            logger.debug("route exists already, not taking it over: %s", _describe(route))
            _write_state(self.state_path, self.applied)
            return False
        self.applied.append(route)
        logger.debug("auto_route: %s", _describe(route))
        return True

    def _pin_sockets(self) -> None:
        for version in self._versions():
            best = self.api.best_route(PROBES[version])
            if best is not None and best.if_index != self.if_index:
                self.physical[version] = best.if_index
        if not self.physical:
            logger.warning("auto_route: no route to the internet outside the TUN was found")
        bypass.set_unicast_interface(self.physical.get(4), self.physical.get(6))

    def plan_exclusions(self, excludes: Iterable[str]) -> list[Route]:
        """Each excluded network via the interface and next hop that reach it now."""
        out: list[Route] = []
        networks = dict.fromkeys(ipaddress.ip_network(text, strict=False) for text in excludes)
        for network in networks:
            if network.version not in self._versions():
                continue
            best = self.api.best_route(network.network_address)
            if best is None or best.if_index == self.if_index:
                logger.warning("auto_route: %s has no route outside the TUN; not excluded", network)
                continue
            out.append(Route(network, best.if_index, best.next_hop, 0))
        return out

    def install_policy(
        self, table: int = 0, mark: int = 0, excludes: Iterable[str] = (), priority: int = 0
    ) -> None:
        """Exclusions first, then the TUN's routes; on any failure undo what was done and raise."""
        try:
            self._pin_sockets()  # before any packet can be tunnelled
            for route in self.plan_exclusions(excludes):
                self._add(route)
            for version in self._versions():
                for prefix in TUN_ROUTES[version]:
                    try:
                        self._add(Route(prefix, self.if_index, on_link(version), 0))
                    except OSError as exc:
                        if version == 4 or version in self.physical:
                            raise
                        # no IPv6 outside either, so nothing can leak: not worth failing for
                        logger.warning("auto_route: no IPv6 route into the TUN: %s", exc)
        except OSError:
            self.restore()
            raise

    def add_device_routes(self, networks: Iterable[str]) -> None:
        """Route ``networks`` (the fake-IP ranges) to the adapter, auto_route or not."""
        for text in networks:
            network = ipaddress.ip_network(text, strict=False)
            try:
                self._add(Route(network, self.if_index, on_link(network.version), 0))
            except OSError as exc:
                logger.warning("could not route %s to the TUN: %s", network, exc)

    def restore(self) -> None:
        """Delete every route added, newest first; unpin the sockets; drop the state file."""
        failed: list[Route] = []
        while self.applied:
            route = self.applied.pop()
            try:
                self.api.delete_route(route)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(route)
                logger.warning("could not remove route %s: %s", _describe(route), exc)
        bypass.clear_unicast_interface()
        self.physical.clear()
        if failed:
            _write_state(self.state_path, failed[::-1])  # the next start tries again
        else:
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()


def _describe(route: Route) -> str:
    hop = "on-link" if route.next_hop.is_unspecified else f"via {route.next_hop}"
    return f"{route.prefix} {hop} if {route.if_index} metric {route.metric}"
