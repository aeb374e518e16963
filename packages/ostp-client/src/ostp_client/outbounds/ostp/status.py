"""What an `ostp` outbound reports about itself: typed here, a dict at the `Outbound.status()`
boundary (the control server maps every outbound's dict onto `control.protocol`'s models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ostp_client.outbounds.ostp.options import SessionState

__all__ = ["SessionStatus"]


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """One session, as `ctl status --json` shows it under its outbound's `sessions`."""

    index: int
    state: SessionState
    session_id: int | None
    rtt_ms: float | None
    """The latest Ping's round trip, None once it is older than a keepalive interval (+1 s)."""
    bytes_up: int
    bytes_down: int
    connected_since: float | None
    """Unix time of the handshake (None while not connected)."""
    reconnects: int
    replacements: int
    """Times session health replaced the session with a fresh handshake."""
    streams: int
    flow_control: bool | None
    datagram_size: int | None
    pmtud: str | None
    receive_buffered: int
    receive_paused: bool
    kernel_drops: int | None
    socket_buffer: int | None
    last_error: str | None
    path: str | None
    """``direct`` or ``turn``."""
    mapped_address: str | None
    relayed_address: str | None
    turn_refreshes: int
    nat_drops: dict[str, int] | None
    transport: str | None
    transport_switches: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
