"""Keep the daemon's own sockets out of the TUN: the process-wide routing mark (Linux).

With ``auto_route`` the TUN inbound sends every packet that does *not* carry the routing mark
to its own routing table, whose default routes lead into the device (policy routing, as
wg-quick and sing-box do it; see `ostp_client.inbounds.tun.linux.PolicyRouting`). A socket the
daemon opens towards the outside world (the `direct` outbound, the ostp sessions' UDP sockets, DNS
forwarded to `direct`) is given that mark with ``SO_MARK`` before it connects or sends, so the
kernel looks it up in the main table and it never loops back into the tunnel.

On Windows there is no mark: the TUN's routes are longer than the default route instead (see
`ostp_client.inbounds.tun.windows_net`), and :func:`apply_bypass` pins the socket to the physical
interface with ``IP_UNICAST_IF`` / ``IPV6_UNICAST_IF`` (ws2ipdef.h; sing-box's outbound sockets
do the same), whose index :func:`set_unicast_interface` set when the routes went in.

The mark is process-wide state on purpose: the TUN inbound sets it when it installs its rules
and clears it when it removes them, and every outbound calls :func:`apply_bypass` on the
sockets it creates, without the mark being threaded through every constructor.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Protocol

from ostp_client.errors import OstpClientError

__all__ = [
    "BypassError",
    "apply_bypass",
    "apply_unicast_interface",
    "clear_routing_mark",
    "clear_tunnel_networks",
    "clear_unicast_interface",
    "inside_tunnel",
    "routing_mark",
    "set_routing_mark",
    "set_tunnel_networks",
    "set_unicast_interface",
    "so_mark_supported",
    "unicast_interface",
]

logger = logging.getLogger(__name__)

SO_MARK = getattr(socket, "SO_MARK", 36)  # linux/asm-generic/socket.h

# ws2ipdef.h (Windows): both 31, IPv4's index in network byte order, IPv6's in host order
IP_UNICAST_IF = 31
IPV6_UNICAST_IF = 31
IPPROTO_IP = 0
IPPROTO_IPV6 = 41

_mark: int | None = None
_tunnel_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
_unicast_if: tuple[int | None, int | None] | None = None


class BypassError(OstpClientError, OSError):
    """A socket could not be given the routing mark (it would loop into the TUN)."""


def set_tunnel_networks(networks: Iterable[str]) -> None:
    """Address ranges that only exist inside the TUN (the fake-IP ranges): outbounds that
    connect from this machine refuse them, since such a connection would loop back in."""
    global _tunnel_networks
    _tunnel_networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def clear_tunnel_networks() -> None:
    global _tunnel_networks
    _tunnel_networks = ()


def inside_tunnel(host: str) -> bool:
    """True if ``host`` is an IP address in one of the TUN's own ranges."""
    if not _tunnel_networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in _tunnel_networks)


def set_routing_mark(mark: int) -> None:
    """Make :func:`apply_bypass` mark sockets with ``mark`` from now on (the TUN inbound)."""
    global _mark
    if not 0 < mark <= 0xFFFFFFFF:
        raise ValueError(f"routing mark {mark:#x} out of range 1..0xffffffff")
    _mark = mark


def clear_routing_mark(mark: int | None = None) -> None:
    """Stop marking (only if ``mark`` is the one set, when given)."""
    global _mark
    if mark is None or _mark == mark:
        _mark = None


def routing_mark() -> int | None:
    """The process-wide mark, None when no TUN (or other owner) asked for one."""
    return _mark


def so_mark_supported() -> bool:
    """This system has ``SO_MARK`` (Linux only)."""
    return sys.platform == "linux"


def set_unicast_interface(ipv4_index: int | None, ipv6_index: int | None) -> None:
    """Windows: pin new sockets to these physical interfaces (the TUN's ``auto_route``)."""
    global _unicast_if
    for index in (ipv4_index, ipv6_index):
        if index is not None and not 0 < index <= 0xFFFFFFFF:
            raise ValueError(f"interface index {index} out of range")
    _unicast_if = (ipv4_index, ipv6_index)


def clear_unicast_interface() -> None:
    global _unicast_if
    _unicast_if = None


def unicast_interface() -> tuple[int | None, int | None] | None:
    """The (IPv4, IPv6) interface indices sockets are pinned to, None when not pinning."""
    return _unicast_if


class _SocketLike(Protocol):
    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None: ...


def apply_unicast_interface(sock: _SocketLike) -> bool:
    """Windows: ``IP_UNICAST_IF`` / ``IPV6_UNICAST_IF`` with the pinned interface's index.

    An IPv6 socket gets both (a dual-stack socket sends IPv4 through the IPv4 option; an
    IPV6_V6ONLY one refuses it, which is fine). Returns True when an option was set.
    """
    if _unicast_if is None:
        return False
    ipv4, ipv6 = _unicast_if
    done = False
    try:
        if sock.family == socket.AF_INET6 and ipv6 is not None:
            sock.setsockopt(IPPROTO_IPV6, IPV6_UNICAST_IF, struct.pack("=I", ipv6))
            done = True
        if ipv4 is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(IPPROTO_IP, IP_UNICAST_IF, struct.pack("!I", ipv4))
                done = True
            except OSError:
                if sock.family == socket.AF_INET:
                    raise
    except OSError as exc:
        raise BypassError(
            exc.errno, f"cannot pin an outgoing socket to its interface ({exc.strerror})"
        ) from None
    return done


def apply_bypass(sock: socket.socket, mark: int | None = None) -> bool:
    """Give ``sock`` the routing mark (``mark``, else the process-wide one) before it is used.

    On Windows, pins it to the physical interface instead (:func:`apply_unicast_interface`).
    Returns True when a mark was set, False when there is none to set (no TUN with
    ``auto_route`` runs, or not Linux). Raises :class:`BypassError` when a mark is wanted but
    the kernel refuses it (``SO_MARK`` needs CAP_NET_ADMIN): such a socket would be routed into
    the tunnel, so it must not be used.
    """
    if _unicast_if is not None:  # only ever set on Windows, by the TUN's routes
        return apply_unicast_interface(sock)
    if mark is None:
        mark = _mark
    if mark is None or not so_mark_supported():
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise BypassError(
            exc.errno,
            f"cannot set SO_MARK {mark:#x} on an outgoing socket ({exc.strerror}); "
            "it needs CAP_NET_ADMIN",
        ) from None
    return True
