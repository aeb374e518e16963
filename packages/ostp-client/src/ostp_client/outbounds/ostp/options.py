"""What an `ostp` outbound and its sessions run by: their limits, states and modes, and the
NAT traversal options."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ostp_client.nat import (
    TurnConfig,
)
from ostp_client.nat.stun import CHANNEL_DATA_HEADER

RECONNECT_DELAY = 5.0  # spec §10.2: fixed back-off, no cap on attempts
RECEIVE_BUFFER_CAP = 64 * 1024 * 1024
"""Bytes buffered for all streams of one session (slow local readers) above which the session
takes no more Data: dropped unacknowledged, asked for again once the readers have caught up
(``ClientConnection.receive_paused``); ACKs keep flowing both ways. With an ostp-py server
each stream's window bounds its buffer long before; an upstream server has no flow control and
gives up on frames refused for about 1.5 s (spec §7.2, §16), so the cap is generous."""
STREAM_WINDOW = 256 * 1024
"""Initial receive window per stream offered to an ostp-py server; it grows for fast readers."""
STREAM_DATAGRAM_SIZE = 32 * 1024
"""Data datagrams over the TCP transports, where there is no IP fragmentation to avoid: the
per-datagram work, not the bytes, bounds a Python tunnel. Uploads over /stream on loopback
(bench/transports_bench.py): 77 MB/s with UDP-sized datagrams, 142 with 4 KB, 209-226 with
16 KB, 251 with 32 KB, 248 with 60,000 bytes. ``auto`` keeps the UDP size on TCP too, since its
session may move back to UDP at any time (docs/protocol-deviations.md)."""
STREAM_HANDSHAKE_TIMEOUT = 4.0  # spec §10.1: over TCP a single attempt with a 4,000 ms limit
RESUME_MIN_INTERVAL = 2.0
"""A TCP connection that dies within this many seconds of the previous one ends the session
instead of being replaced again (a server refusing us must not cause a connection storm)."""


TURN_OVERHEAD = CHANNEL_DATA_HEADER + 3  # RFC 8656 §12.4 header, §12.5 padding to 4 bytes
RTT_SHOWN_GRACE = 1.0
"""The RTT shown is the latest sample if it is at most ``keepalive_interval`` plus this old
(a Pong answers each keepalive Ping within a round trip); older, none is shown."""


class SessionState(StrEnum):
    """A session's (and the outbound's) state; the value is what `ctl status` shows."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class TransportMode(StrEnum):
    """How a session's datagrams reach the server (the outbound's `transport`, spec §10.6)."""

    UDP = "udp"
    TCP = "tcp"
    WSS = "wss"
    AUTO = "auto"


PROBE_BACKOFF = 8
"""``auto``: the interval between UDP probes doubles while they fail, up to this many times
``auto_probe_interval``."""


class NatMode(StrEnum):
    """The outbound's NAT traversal (`nat.mode`)."""

    DIRECT = "direct"
    TURN = "turn"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class NatOptions:
    """The NAT traversal of one outbound, host names still unresolved."""

    mode: NatMode = NatMode.DIRECT
    stun: tuple[tuple[str, int], ...] = ()
    """STUN servers asked for the mapped address at the start of every session."""
    turn: TurnConfig | None = None
    """The TURN server (``server`` may be a host name; it is resolved for every session)."""
    retry_direct_after: float = 600.0
    """``auto``: seconds after a fallback to TURN before a new session tries direct again."""
