"""Events handed out by the NAT machinery: frozen, slotted, named in the past tense."""

from __future__ import annotations

import enum
from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class BindingSucceeded:
    """A STUN Binding transaction learned our public (server-reflexive) address."""

    server: Address
    mapped_address: Address


@dataclass(frozen=True, slots=True)
class BindingFailed:
    """A STUN Binding transaction got no usable answer."""

    server: Address
    message: str


@dataclass(frozen=True, slots=True)
class AllocationSucceeded:
    """The TURN server granted a relayed transport address."""

    relayed_address: Address
    mapped_address: Address | None
    lifetime: int


@dataclass(frozen=True, slots=True)
class RelayReady:
    """Permission and channel for the peer are installed: datagrams can flow as ChannelData."""

    peer: Address
    channel: int
    relayed_address: Address


@dataclass(frozen=True, slots=True)
class TurnRefreshed:
    """An allocation ("allocation"), permission ("permission") or channel ("channel") refresh
    succeeded; ``lifetime`` is the allocation's new lifetime or the fixed RFC lifetime."""

    what: str
    lifetime: int


class TurnFailure(enum.Enum):
    """Why TURN relaying failed."""

    WRONG_CREDENTIALS = "wrong-credentials"
    ALLOCATION_REFUSED = "allocation-refused"
    UNREACHABLE = "unreachable"
    ALLOCATION_LOST = "allocation-lost"
    PROTOCOL = "protocol"


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """TURN relaying failed for good; ``message`` is meant for the user (no secrets in it)."""

    reason: TurnFailure
    message: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class TurnClosed:
    """The allocation was released (Refresh with LIFETIME 0 answered, or given up on)."""

    deallocated: bool


NatEvent = (
    BindingSucceeded
    | BindingFailed
    | AllocationSucceeded
    | RelayReady
    | TurnRefreshed
    | TurnFailed
    | TurnClosed
)
