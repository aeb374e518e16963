"""Events handed to the caller by :meth:`~ostp_netstack.stack.NetStack.next_event`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

__all__ = [
    "Endpoint",
    "Event",
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


class Endpoint(NamedTuple):
    """An address and port; ``host`` in the compressed text form of :mod:`ipaddress`."""

    host: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpConnectionRequested:
    """A SYN from ``src`` (the local application) to ``dst`` (any host); accept or refuse it."""

    conn_id: int
    src: Endpoint
    dst: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class TcpConnectionEstablished:
    """The three-way handshake of an accepted connection completed."""

    conn_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpDataReceived:
    """In-order bytes from the application; call ``tcp_consumed`` once they are passed on."""

    conn_id: int
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class TcpPeerClosed:
    """The application sent FIN: no more data will arrive (the send side stays open)."""

    conn_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpSendReady:
    """Room opened in the send buffer after a ``tcp_send`` accepted less than offered."""

    conn_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpConnectionReset:
    """The connection is gone abruptly: RST from the application, or timeouts; ``reason`` says
    which. The ``conn_id`` is no longer valid."""

    conn_id: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class TcpConnectionClosed:
    """Both directions closed cleanly; the ``conn_id`` is no longer valid."""

    conn_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class UdpDatagramReceived:
    """A datagram from ``src`` (the local application) to ``dst``, in flow ``flow_id``."""

    flow_id: int
    src: Endpoint
    dst: Endpoint
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class UdpFlowExpired:
    """No datagram in either direction for ``udp_idle_timeout``; the ``flow_id`` is gone."""

    flow_id: int


Event = (
    TcpConnectionRequested
    | TcpConnectionEstablished
    | TcpDataReceived
    | TcpPeerClosed
    | TcpSendReady
    | TcpConnectionReset
    | TcpConnectionClosed
    | UdpDatagramReceived
    | UdpFlowExpired
)
