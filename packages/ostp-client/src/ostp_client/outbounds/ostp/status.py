"""What an `ostp` outbound reports about itself (`OstpOutbound.status()`): the outbound's totals
and one `SessionStatus` per session. The control server maps them onto `control.protocol`'s
models, the metrics onto gauges and counters."""

from __future__ import annotations

from dataclasses import dataclass

from ostp_client.flow import OutboundReport
from ostp_client.outbounds.ostp.options import SessionState
from ostp_proto import ConnectionStats
from ostp_proto.arq import SenderStats

__all__ = ["OstpReport", "SessionStatus"]


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
    sender: SenderStats | None = None
    """The current connection's sender counters (a copy), None without one."""
    counters: ConnectionStats | None = None
    """The current connection's receive counters and drops (a copy), None without one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OstpReport(OutboundReport):
    """An ostp outbound: its sessions and their totals."""

    server: str
    """The configured server, `host:port`."""
    rtt_ms: float | None = None
    """The smallest round trip of the sessions."""
    bytes_up: int = 0
    """Bytes of the sessions' datagrams (up: sent to the server)."""
    bytes_down: int = 0
    reconnects: int = 0
    connected_since: float | None = None
    """Unix time of the oldest connected session's handshake."""
    streams: int = 0
    kernel_drops: int | None = None
    nat_mode: str | None = None
    transport: str | None = None
    """The configured transport (`udp`, `tcp`, `wss`, `reality` or `auto`)."""
    mapped_address: str | None = None
    sessions: tuple[SessionStatus, ...] = ()
