"""Events a connection hands to its owner (small, frozen, named in the past tense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from .relay import RelayMessage


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """The session is established; data may flow."""

    session_id: int
    rtt: float | None
    """Seconds from message 1 to message 2 (client only)."""


@dataclass(frozen=True, slots=True)
class RelayMessageReceived:
    """A relay message arrived in order on ``stream_id`` (Ping/Pong/KeepAlive are handled)."""

    stream_id: int
    message: RelayMessage


@dataclass(frozen=True, slots=True)
class DataLost:
    """The peer gave up on ``count`` datagrams; every stream of this session may have a hole.

    Only an upstream peer gives up on frames (spec §16). The owner must reset all streams of
    the session instead of delivering data with a hole in it.
    """

    count: int


@dataclass(frozen=True, slots=True)
class ExtensionsNegotiated:
    """The peer answered ostp-py's extension hello (docs/flow-control.md).

    ``flags`` are the extensions now in use (0: the peer understood the hello but uses none).
    Never raised with an upstream peer: it neither sends nor answers a hello.
    """

    flags: int
    peer_stream_window: int
    """The peer's initial receive window per stream."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over (``reason`` says why); nothing more will be sent or received."""

    reason: str


Event: TypeAlias = (
    HandshakeCompleted
    | RelayMessageReceived
    | DataLost
    | ExtensionsNegotiated
    | ConnectionTerminated
)
