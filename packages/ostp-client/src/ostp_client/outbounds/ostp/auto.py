"""Transport ``auto`` (README, "Transports"; docs/protocol-deviations.md): when a session uses
UDP, when it falls back to TCP, when it probes for UDP again and how often. Bookkeeping only
(times and outcomes in, decisions out); the session opens the sockets and moves the connection.

- An attempt starts on UDP unless UDP did not pass lately (then on ``auto_fallback``).
- No handshake over UDP within ``auto_udp_timeout``: the attempt ends and the next one starts on
  TCP at once.
- A live session on UDP that neither heard anything nor had what it sent acknowledged for two
  keepalive intervals moves to TCP (if TCP fails too, it asks again a keepalive interval later).
- While a live session is on TCP, one UDP probe at a time runs beside it, every
  ``auto_probe_interval`` seconds, the interval doubling while probes fail, up to
  :data:`~.options.PROBE_BACKOFF` times; a completed probe moves the session back to UDP.
- TCP failing, or a session on TCP ending, sends the next attempt to UDP first again.
"""

from __future__ import annotations

import enum

from ostp_client.outbounds.ostp.options import PROBE_BACKOFF, TransportMode
from ostp_proto import ClientConnection

__all__ = ["AutoStep", "AutoTransport", "udp_progress"]


class AutoStep(enum.Enum):
    """What :meth:`AutoTransport.step` asks the session to do now."""

    STAY = "stay"
    """Nothing now (wake up by :attr:`AutoTransport.deadline`, if it is set)."""
    END_ATTEMPT = "end attempt"
    """No UDP handshake in ``auto_udp_timeout``: end the attempt; the next, at once, is on TCP."""
    FALL_BACK = "fall back"
    """UDP stopped passing on a live session: move it to TCP (and say how it went:
    :meth:`~AutoTransport.fell_back` or :meth:`~AutoTransport.fallback_failed`)."""
    PROBE = "probe"
    """On TCP: start a UDP probe beside the session (:meth:`~AutoTransport.probe_ended` when
    its task ends)."""
    MOVE_TO_UDP = "move to UDP"
    """A probe completed and the session is live: continue it on the probe's socket."""
    DROP_PROBE = "drop probe"
    """A probe completed but the session is not live: close the probe's socket."""


def udp_progress(conn: ClientConnection, now: float) -> float:
    """When the UDP path last showed it passes both ways: the later of nothing arriving and
    nothing we sent being acknowledged (the keepalive Ping is outstanding at least once per
    interval, so a path that drops only our direction shows here while the server's
    retransmissions keep arriving)."""
    sender = conn.sender
    return min(conn.last_receive, sender.delivered_time if sender.outstanding else now)


class AutoTransport:
    """Transport ``auto`` of one session, across its attempts."""

    __slots__ = (
        "attempt_started",
        "base_interval",
        "deadline",
        "fallback",
        "keepalive_interval",
        "next_fallback",
        "probe_interval",
        "probing",
        "udp_blocked",
        "udp_timeout",
    )

    def __init__(
        self,
        *,
        fallback: TransportMode,
        udp_timeout: float,
        keepalive_interval: float,
        probe_interval: float,
    ) -> None:
        self.fallback = fallback
        """The TCP transport used while UDP does not pass (``tcp`` or ``wss``)."""
        self.udp_timeout = udp_timeout
        self.keepalive_interval = keepalive_interval
        self.base_interval = probe_interval
        """``auto_probe_interval``: the first wait before a probe, and after a probe completed."""
        self.udp_blocked = False
        """UDP did not pass lately: attempts start on TCP and a probe looks for UDP."""
        self.attempt_started = 0.0
        self.next_fallback = 0.0
        """No move to TCP before this (TCP failed too at the last try)."""
        self.probing = False
        """A probe task runs."""
        self.probe_interval = probe_interval
        """The wait before the next probe."""
        self.deadline: float | None = None
        """When :meth:`step` has something to decide next (None: not before something else
        happens); the session sleeps no longer than this."""

    def first_transport(self) -> TransportMode:
        """The transport an attempt starts on."""
        return self.fallback if self.udp_blocked else TransportMode.UDP

    def new_attempt(self, now: float) -> None:
        self.attempt_started = now

    def tcp_ended(self) -> None:
        """TCP failed to connect, or a session on TCP ended: the next attempt tries UDP first."""
        self.udp_blocked = False

    def step(
        self,
        now: float,
        *,
        reliable: bool,
        established: bool,
        progress: float,
        probe_ready: bool,
    ) -> AutoStep:
        """What to do now, for a session on a ``reliable`` (TCP) transport or on UDP, with the
        handshake done (``established``) or not, its :func:`udp_progress`, and a completed
        probe waiting (``probe_ready``) or not."""
        self.deadline = None
        if reliable:
            if probe_ready:
                if not established:
                    return AutoStep.DROP_PROBE
                self.udp_blocked = False
                return AutoStep.MOVE_TO_UDP
            if established and not self.probing:
                self.probing = True
                return AutoStep.PROBE
            return AutoStep.STAY
        if not established:
            deadline = self.attempt_started + self.udp_timeout
            if now < deadline:
                self.deadline = deadline
                return AutoStep.STAY
            self.udp_blocked = True
            return AutoStep.END_ATTEMPT
        deadline = max(progress + 2 * self.keepalive_interval, self.next_fallback)
        if now < deadline:
            self.deadline = deadline
            return AutoStep.STAY
        return AutoStep.FALL_BACK

    def fell_back(self) -> None:
        """The session moved to TCP."""
        self.udp_blocked = True

    def fallback_failed(self, now: float) -> None:
        """TCP failed too: stay on UDP and try again a keepalive interval from ``now``."""
        self.next_fallback = now + self.keepalive_interval

    def probe_succeeded(self) -> None:
        self.probe_interval = self.base_interval

    def probe_failed(self) -> float:
        """A probe got no handshake: the wait before the next, doubled up to its cap."""
        self.probe_interval = min(self.probe_interval * 2, PROBE_BACKOFF * self.base_interval)
        return self.probe_interval

    def probe_ended(self) -> None:
        """The probe task ended (completed, or cancelled with its attempt)."""
        self.probing = False
