"""Events a connection hands to its owner (small, frozen, named in the past tense)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
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
    """The peer gave up on its datagrams ``first_nonce``..``last_nonce`` (spec §7.2, §16).

    Each lost datagram belonged to one stream, but which one cannot be known.
    ``stream_ids`` are the streams that may have lost data: those the connection knew of (we
    sent on them, or the peer did) before the peer sent the lost datagrams, and that no Close
    has ended since. The owner must reset them instead of delivering their data with a hole in
    it; a stream opened after the loss is never named. Only an upstream peer gives up on
    datagrams; ours never does.
    """

    first_nonce: int
    last_nonce: int
    stream_ids: frozenset[int]

    @property
    def count(self) -> int:
        """How many datagrams were lost."""
        return self.last_nonce - self.first_nonce + 1


@dataclass(frozen=True, slots=True)
class ExtensionsNegotiated:
    """The peer answered ostp-py's extension hello (docs/flow-control.md).

    ``flags`` are the extensions now in use (0: the peer understood the hello but uses none).
    Never raised with an upstream peer: it neither sends nor answers a hello.
    """

    flags: int
    peer_stream_window: int
    """The peer's initial receive window per stream."""


class Termination(Enum):
    """Why a connection ended (``ConnectionTerminated.cause``), for code to act on."""

    CLOSED_LOCALLY = "closed locally"
    CLOSED_BY_PEER = "closed by peer"
    IDLE_TIMEOUT = "idle timeout"
    NONCE_EXHAUSTED = "nonce space exhausted"
    HANDSHAKE_TIMED_OUT = "handshake timed out"


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over; nothing more will be sent or received."""

    reason: str
    """Why, for people (logs, status)."""
    cause: Termination
    """Why, for code."""


Event: TypeAlias = (
    HandshakeCompleted
    | RelayMessageReceived
    | DataLost
    | ExtensionsNegotiated
    | ConnectionTerminated
)
