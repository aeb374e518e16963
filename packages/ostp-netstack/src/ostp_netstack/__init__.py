"""ostp_netstack: a sans-IO user-space TCP/IP stack (IPv4/IPv6, TCP, UDP) for a TUN device.

Feed raw IP packets and the time to :class:`NetStack`; take back packets to write and events.
"""

from ostp_netstack.config import NetStackConfig
from ostp_netstack.errors import LocalProtocolError
from ostp_netstack.events import (
    Endpoint,
    Event,
    TcpConnectionClosed,
    TcpConnectionEstablished,
    TcpConnectionRequested,
    TcpConnectionReset,
    TcpDataReceived,
    TcpPeerClosed,
    TcpSendReady,
    UdpDatagramReceived,
    UdpFlowExpired,
)
from ostp_netstack.stack import NetStack
from ostp_netstack.stats import Drop, NetStackStats

__all__ = [
    "Drop",
    "Endpoint",
    "Event",
    "LocalProtocolError",
    "NetStack",
    "NetStackConfig",
    "NetStackStats",
    "TcpConnectionClosed",
    "TcpConnectionEstablished",
    "TcpConnectionRequested",
    "TcpConnectionReset",
    "TcpDataReceived",
    "TcpPeerClosed",
    "TcpSendReady",
    "UdpDatagramReceived",
    "UdpFlowExpired",
]

__version__ = "0.2.0.dev0"
"""The package version (read by the build: `[tool.hatch.version]`)."""
