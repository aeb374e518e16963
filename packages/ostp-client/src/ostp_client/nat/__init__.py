"""STUN (RFC 8489) and TURN over UDP (RFC 8656) as sans-IO machinery for one UDP socket.

Nothing here owns a socket or reads the clock: the session shell feeds datagrams
``(data, from_addr, now)`` into a :class:`NatMux`, sends what ``datagrams_to_send(now)`` returns,
drains ``next_event()`` and sleeps until ``get_timer()``.
"""

from ostp_client.nat.config import NatConfig, TurnConfig
from ostp_client.nat.demux import Classified, DatagramKind, NatCounters, NatMux, classify
from ostp_client.nat.errors import LocalNatError, NatError, StunParseError
from ostp_client.nat.events import (
    AllocationSucceeded,
    BindingFailed,
    BindingSucceeded,
    NatEvent,
    RelayReady,
    TurnClosed,
    TurnFailed,
    TurnFailure,
    TurnRefreshed,
)

__all__ = [
    "AllocationSucceeded",
    "BindingFailed",
    "BindingSucceeded",
    "Classified",
    "DatagramKind",
    "LocalNatError",
    "NatConfig",
    "NatCounters",
    "NatError",
    "NatEvent",
    "NatMux",
    "RelayReady",
    "StunParseError",
    "TurnClosed",
    "TurnConfig",
    "TurnFailed",
    "TurnFailure",
    "TurnRefreshed",
    "classify",
]
