"""The NAT path of one session (the outbound's ``nat`` block): whether an attempt goes direct or
through the TURN relay, and what the STUN and TURN servers said about the current one. No I/O:
times and :mod:`ostp_client.nat` events in, decisions out; the session owns the socket and the
:class:`~ostp_client.nat.NatMux`, and logs through the outbound's logger as before.

Mode ``auto`` starts direct and relays the next attempt, at once, when a direct handshake gets no
answer. It tries direct again when the relay fails, when a relayed handshake gets no answer too,
or at the first attempt ``retry_direct_after`` seconds after it fell back: a working relayed
session is never interrupted to probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ostp_client.nat import (
    AllocationSucceeded,
    BindingFailed,
    BindingSucceeded,
    NatEvent,
    RelayReady,
    TurnClosed,
    TurnFailed,
    TurnRefreshed,
)
from ostp_client.outbounds.ostp.options import NatMode, NatOptions
from ostp_proto.address import format_sockaddr

__all__ = ["EndAttempt", "NatPath", "StartHandshake", "WarnOnce"]

logger = logging.getLogger("ostp_client.outbounds.ostp")  # one logger name for the whole outbound


@dataclass(frozen=True, slots=True)
class StartHandshake:
    """The relay is ready: the OSTP handshake may start (if it has not)."""


@dataclass(frozen=True, slots=True)
class WarnOnce:
    """Something the user should know, once (a failing server fails every attempt alike)."""

    message: str


@dataclass(frozen=True, slots=True)
class EndAttempt:
    """The relay failed: the attempt ends with ``message``."""

    message: str


NatVerdict = StartHandshake | WarnOnce | EndAttempt


class NatPath:
    """How one session reaches its server over UDP, across its attempts."""

    __slots__ = (
        "mapped_address",
        "name",
        "nat",
        "path",
        "relay",
        "relay_since",
        "relayed_address",
        "turn_refreshes",
    )

    def __init__(self, nat: NatOptions | None, name: str) -> None:
        self.nat = nat
        self.name = name
        """How log lines name the session (``<tag> session <index>``)."""
        self.relay = False
        """``auto``: the next attempt goes through TURN."""
        self.relay_since = 0.0
        """``auto``: when the session fell back to TURN."""
        self.path: str | None = None
        """How the current (or last) UDP attempt reaches the server: ``direct`` or ``turn``."""
        self.mapped_address: tuple[str, int] | None = None
        self.relayed_address: tuple[str, int] | None = None
        self.turn_refreshes = 0

    def choose(self, now: float) -> bool:
        """True if an attempt starting ``now`` goes through TURN."""
        nat = self.nat
        if nat is None or nat.turn is None or nat.mode == NatMode.DIRECT:
            return False
        if nat.mode == NatMode.TURN:
            return True
        if self.relay and now - self.relay_since >= nat.retry_direct_after:
            self.relay = False
            logger.info(
                "%s: %.0f s on TURN; trying direct UDP again", self.name, nat.retry_direct_after
            )
        return self.relay

    def begin(self, relay: bool) -> None:
        """A UDP attempt starts on a new socket, through TURN or not."""
        self.path = "turn" if relay else "direct"
        self.mapped_address = self.relayed_address = None

    def handshake_timed_out(self, now: float) -> bool:
        """The handshake got no answer; True if the next attempt should start at once, through
        TURN (``auto`` after a direct attempt: it already took its time, no back-off)."""
        nat = self.nat
        if nat is None or nat.mode != NatMode.AUTO or nat.turn is None:
            return False
        if self.path == "direct":
            logger.warning(
                "%s: no answer over direct UDP; falling back to TURN server %s",
                self.name,
                format_sockaddr(nat.turn.server),
            )
            self.relay = True
            self.relay_since = now
            return True
        self.relay = False  # no answer through the relay either: direct next time
        return False

    def relay_failed(self) -> None:
        """The relay failed (its server unresolvable, or a :class:`~ostp_client.nat.TurnFailed`):
        ``auto`` tries direct next time."""
        nat = self.nat
        if nat is not None and nat.mode == NatMode.AUTO:
            self.relay = False

    def on_event(self, event: NatEvent) -> NatVerdict | None:
        """Take in one event of the session's :class:`~ostp_client.nat.NatMux`."""
        match event:
            case BindingSucceeded():
                if self.mapped_address is None:  # the first answer wins
                    self.mapped_address = event.mapped_address
                logger.info(
                    "%s: STUN server %s maps this socket to %s",
                    self.name,
                    format_sockaddr(event.server),
                    format_sockaddr(event.mapped_address),
                )
            case BindingFailed():
                return WarnOnce(event.message)
            case AllocationSucceeded():
                self.relayed_address = event.relayed_address
                if self.mapped_address is None and event.mapped_address is not None:
                    self.mapped_address = event.mapped_address
                logger.info(
                    "%s: TURN relayed address %s (lifetime %d s)",
                    self.name,
                    format_sockaddr(event.relayed_address),
                    event.lifetime,
                )
            case RelayReady():
                logger.info(
                    "%s: relaying to %s through TURN channel 0x%04x",
                    self.name,
                    format_sockaddr(event.peer),
                    event.channel,
                )
                return StartHandshake()
            case TurnRefreshed():
                self.turn_refreshes += 1
                logger.debug("%s: TURN %s refreshed", self.name, event.what)
            case TurnFailed():
                return EndAttempt(event.message)
            case TurnClosed():
                pass
        return None
