"""Configuration of the NAT traversal machinery (frozen dataclasses, no pydantic).

The daemon's pydantic config resolves host names and converts itself into these at the
boundary; addresses here are literal IPs, as the socket reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class TurnConfig:
    """A TURN server and the long-term credentials for it (RFC 8656 §3, RFC 8489 §9.2)."""

    server: Address
    """The TURN server's UDP address (literal IP)."""
    username: str
    """Long-term credential user name."""
    password: str = field(repr=False)
    """Long-term credential password; never logged or shown in a repr."""
    lifetime: int | None = None
    """LIFETIME requested on Allocate and Refresh, seconds; None lets the server choose (600)."""
    refresh_fraction: float = 0.8
    """Refresh the allocation when this fraction of its granted lifetime has passed."""
    permission_refresh: float = 240.0
    """Seconds between CreatePermission refreshes; permissions expire at 300 s (RFC 8656 §9)."""
    channel_refresh: float = 480.0
    """Seconds between ChannelBind refreshes; bindings expire at 600 s (RFC 8656 §12)."""
    channel: int = 0x4000
    """The channel number bound to the peer (0x4000-0x4FFF, RFC 8656 §12)."""
    pad_channel_data: bool = False
    """Pad outgoing ChannelData to 4 bytes (optional over UDP, RFC 8656 §12.5)."""
    max_stale_nonce_retries: int = 3
    """Consecutive 438 (Stale Nonce) answers tolerated for one request before giving up."""
    software: str | None = None
    """SOFTWARE attribute to send, or None to send none."""


@dataclass(frozen=True, slots=True)
class NatConfig:
    """The STUN retransmission parameters (RFC 8489 §6.2.1) and the optional TURN server."""

    rto: float = 0.5
    """Initial retransmission timeout, seconds (RFC 8489 §6.2.1: 500 ms); doubled each time."""
    rc: int = 7
    """Number of transmissions of a request before giving up (Rc)."""
    rm: int = 16
    """After the last transmission wait ``rm * rto`` for an answer (Rm)."""
    turn: TurnConfig | None = None
    """TURN relaying, if configured."""
