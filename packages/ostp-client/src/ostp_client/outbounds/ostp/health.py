"""Session health (issue 13 item 4): when a live session should be replaced by a fresh
handshake. Bookkeeping only (times in, verdicts out); the session does the replacing.

Two signs, each with one warning when it fires: the keepalive Pings went unanswered for
:data:`SILENT_PING_INTERVALS` intervals, or :data:`UNANSWERED_CONNECTS` Connects in a row got
no answer within ``connect_timeout`` while datagrams kept arriving.
"""

from __future__ import annotations

import math

from ostp_proto import ClientConnection

__all__ = ["SILENT_PING_INTERVALS", "UNANSWERED_CONNECTS", "SessionHealth"]

SILENT_PING_INTERVALS = 3
"""A session whose keepalive Pings got no answer for this many intervals is replaced."""
UNANSWERED_CONNECTS = 2
"""A session on which this many Connects in a row (none answered in between) got no ConnectOk
within ``connect_timeout`` while datagrams kept arriving is replaced. One is not enough: a
target that swallows SYNs keeps our own server from answering for its 10 s connect timeout."""


class SessionHealth:
    """The health of one session's current connection."""

    __slots__ = ("attempt_started", "paused_at", "switched_at", "unanswered")

    def __init__(self) -> None:
        self.attempt_started = 0.0
        """When the current attempt began (the RTT's age before any Pong was answered)."""
        self.unanswered = 0
        """Connects in a row that timed out while datagrams arrived (no answer in between)."""
        self.paused_at = -math.inf
        """The last time the session refused Data (its Pongs were refused too)."""
        self.switched_at = -math.inf
        """When the session last moved to another transport: the new path is judged from
        then on (its Pings were answered, or not, on the old one)."""

    def new_attempt(self, now: float) -> None:
        self.attempt_started = now
        self.unanswered = 0

    def rtt_sampled_at(self, conn: ClientConnection) -> float:
        at = conn.rtt_sampled_at
        return at if at is not None else self.attempt_started

    def ping_deadline(self, conn: ClientConnection, keepalive_interval: float) -> float | None:
        """When the keepalive Pings will have gone unanswered for too long; None while the
        connection is not established or itself refuses Data (``receive_paused``: the Pongs
        wait for our readers, not for the server)."""
        if not conn.established or conn.receive_paused:
            return None
        since = max(self.rtt_sampled_at(conn), self.paused_at, self.switched_at)
        return since + SILENT_PING_INTERVALS * keepalive_interval

    def connect_answered(self) -> None:
        """A Connect got its ConnectOk or Error: the server answers relay requests."""
        self.unanswered = 0

    def connect_unanswered(self, conn: ClientConnection | None, sent_at: float) -> bool:
        """A Connect sent at ``sent_at`` got no answer; True if the session should be replaced.
        Only if datagrams arrived after it (the session is alive) and no Connect was answered
        meanwhile: the session may be wedged (an answer stuck behind a hole, a server that
        ignores Connect)."""
        if conn is None or not conn.established or conn.last_receive <= sent_at:
            return False  # nothing arrived since: the idle and keepalive checks decide
        self.unanswered += 1
        return self.unanswered >= UNANSWERED_CONNECTS
