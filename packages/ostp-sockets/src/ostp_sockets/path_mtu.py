"""Path-MTU socket options: datagrams with DF set, and the first hop's MTU (Linux).

Path MTU discovery itself (RFC 8899 DPLPMTUD) is sans-IO in :mod:`ostp_proto.pmtud`; these are
the two things it needs from the socket: never to be fragmented, and the ceiling the route
towards the peer allows.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

__all__ = [
    "IPV4_UDP_OVERHEAD",
    "IPV6_UDP_OVERHEAD",
    "first_hop_payload",
    "set_dont_fragment",
    "udp_overhead",
]

# linux/in.h, linux/in6.h
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
PMTUDISC_PROBE = 3  # IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: DF set, the kernel's PMTU ignored
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
IPV4_UDP_OVERHEAD = 28  # IPv4 header (20) + UDP header (8)
IPV6_UDP_OVERHEAD = 48  # IPv6 header (40) + UDP header (8)


def set_dont_fragment(sock: socket.socket) -> bool:
    """Send every datagram with DF set and without the kernel's path MTU cache (Linux).

    ``IP_PMTUDISC_PROBE``: a datagram larger than the route's MTU is never fragmented; above the
    interface's MTU it is refused with ``EMSGSIZE``; an ICMP "too big" does not shrink later
    sends behind our back (path MTU discovery decides sizes). An IPv6 socket gets the IPv4
    option too, for the IPv4-mapped peers of a dual-stack socket. False where not supported.
    """
    if sys.platform != "linux":
        return False
    ok = False
    levels = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        levels.insert(0, (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    for level, option in levels:
        try:
            sock.setsockopt(level, option, PMTUDISC_PROBE)
            ok = True
        except OSError:
            pass
    return ok


def udp_overhead(family: int) -> int:
    """IP and UDP header bytes in front of a datagram's payload."""
    return IPV6_UDP_OVERHEAD if family == socket.AF_INET6 else IPV4_UDP_OVERHEAD


def first_hop_payload(family: int, address: Any) -> int | None:
    """The largest UDP payload the route towards ``address`` carries without fragmenting
    (its first hop's MTU minus headers), or None where the system does not say (Linux only).

    Asked of a throw-away connected socket, so it works for unconnected sockets too."""
    if sys.platform != "linux":
        return None
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            if family == socket.AF_INET6:
                mtu = probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            else:
                mtu = probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return None
    return int(mtu) - udp_overhead(family) if mtu > 0 else None
