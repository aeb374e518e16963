"""One UDP socket, three kinds of datagram: our STUN answers, TURN ChannelData, and the rest.

:func:`classify` is the pure rule; :class:`NatMux` is the sans-IO object the session shell
puts on its socket. Datagrams that look like STUN but are not answers to one of our
outstanding transactions (unknown transaction id, bad FINGERPRINT, malformed) are dropped and
counted, never raised and never handed to the OSTP layer.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, fields

from ostp_client.nat.binding import BindingClient
from ostp_client.nat.config import NatConfig
from ostp_client.nat.errors import LocalNatError, StunParseError
from ostp_client.nat.events import NatEvent
from ostp_client.nat.stun import (
    MessageClass,
    Method,
    StunMessage,
    decode_channel_data,
    decode_message,
    looks_like_channel_data,
    looks_like_stun,
)
from ostp_client.nat.transaction import TransactionTable
from ostp_client.nat.turn import TurnClient, TurnState

Address = tuple[str, int]


class DatagramKind(enum.Enum):
    STUN = "stun"
    """An answer to one of our outstanding transactions, or a Data indication from the TURN
    server."""
    CHANNEL_DATA = "channel-data"
    """TURN ChannelData from the TURN server."""
    OTHER = "other"
    """Anything else: an OSTP datagram for the protocol layer."""
    STRAY = "stray"
    """STUN-looking but not ours: drop and count (``drop_reason`` names the counter)."""


@dataclass(frozen=True, slots=True)
class Classified:
    kind: DatagramKind
    message: StunMessage | None = None
    channel: int = 0
    payload: bytes = b""
    drop_reason: str = ""


_OTHER = Classified(DatagramKind.OTHER)


def _same(a: tuple[object, ...], b: Address | None) -> bool:
    return b is not None and a[0] == b[0] and a[1] == b[1]


def classify(
    data: bytes,
    from_addr: tuple[object, ...],
    *,
    transactions: Container[bytes],
    turn_server: Address | None = None,
) -> Classified:
    """Sort one incoming datagram (RFC 8489 §7.3, RFC 8656 §12.4-12.5, RFC 7983's first-byte rule).

    ``from_addr`` may be the 4-tuple an IPv6 socket reports; only host and port are compared.
    """
    if looks_like_stun(data):
        try:
            message = decode_message(data)
        except StunParseError:
            return Classified(DatagramKind.STRAY, drop_reason="stun_malformed_drop")
        if message.has_fingerprint and not message.verify_fingerprint():
            return Classified(DatagramKind.STRAY, drop_reason="stun_fingerprint_drop")
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            if message.transaction_id in transactions:
                return Classified(DatagramKind.STUN, message=message)
            return Classified(DatagramKind.STRAY, drop_reason="stun_unknown_transaction_drop")
        if (
            message.cls is MessageClass.INDICATION
            and message.method == Method.DATA
            and _same(from_addr, turn_server)
        ):
            return Classified(DatagramKind.STUN, message=message)
        return Classified(DatagramKind.STRAY, drop_reason="stun_unexpected_drop")
    if _same(from_addr, turn_server) and looks_like_channel_data(data):
        channel, payload = decode_channel_data(data)
        return Classified(DatagramKind.CHANNEL_DATA, channel=channel, payload=payload)
    return _OTHER


@dataclass(slots=True)
class NatCounters:
    """Dropped input, by reason (``<layer>_<reason>_drop`` as STYLE.md asks)."""

    stun_malformed_drop: int = 0
    stun_fingerprint_drop: int = 0
    stun_unknown_transaction_drop: int = 0
    stun_unexpected_drop: int = 0
    stun_rejected_drop: int = 0
    """Answer with our transaction id that its owner refused (bad MESSAGE-INTEGRITY, ...)."""
    turn_channel_drop: int = 0
    """ChannelData on a channel we did not bind, or before the relay is ready."""
    turn_indication_drop: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NatMux:
    """Everything NAT-related on one session socket, sans-IO.

    The shell loop: ``receive_datagram()`` for each datagram read (it returns the OSTP datagram
    to hand on, if any), ``next_event()`` until None, send ``datagrams_to_send(now)``, sleep until
    ``get_timer()`` and then call ``handle_timer(now)``. Outgoing OSTP datagrams go through
    ``wrap()``, which relays them once TURN is ready.
    """

    def __init__(
        self, config: NatConfig | None = None, *, urandom: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.config = config or NatConfig()
        self.counters = NatCounters()
        self._events: deque[NatEvent] = deque()
        self._transactions = TransactionTable(self.config, urandom)
        self._binding = BindingClient(self._transactions, self._events.append)
        self.turn: TurnClient | None = (
            TurnClient(self.config.turn, self._transactions, self._events.append)
            if self.config.turn is not None
            else None
        )

    # --- control --------------------------------------------------------------------------------

    @property
    def mapped_address(self) -> Address | None:
        """The last server-reflexive address learned by Binding (or Allocate)."""
        if self._binding.mapped_address is not None:
            return self._binding.mapped_address
        return self.turn.mapped_address if self.turn is not None else None

    @property
    def relaying(self) -> bool:
        """True when outgoing datagrams to the TURN peer go as ChannelData."""
        return self.turn is not None and self.turn.ready

    def start_binding(self, server: Address, now: float) -> bytes:
        """Send a STUN Binding request to ``server``; the answer arrives as an event."""
        return self._binding.start((server[0], server[1]), now)

    def start_turn(self, peer: Address, now: float) -> None:
        """Allocate on the configured TURN server and bind a channel to ``peer``."""
        if self.turn is None:
            raise LocalNatError("no TURN server configured")
        self.turn.allocate(peer, now)

    def close(self, now: float) -> None:
        """Deallocate (if allocated); a :class:`TurnClosed` event follows."""
        if self.turn is not None:
            self.turn.close(now)

    # --- datagrams ------------------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes, from_addr: tuple[object, ...], now: float
    ) -> tuple[bytes, Address] | None:
        """Feed one datagram read from the socket.

        Returns ``(ostp_datagram, peer_address)`` to hand to the protocol layer (for relayed
        data the peer is the TURN peer, not the TURN server), or None when it was consumed or
        dropped.
        """
        turn = self.turn
        server = turn.server if turn is not None else None
        if (
            turn is not None
            and turn.state is TurnState.READY
            and data
            and data[0] & 0xC0 == 0x40
            and from_addr[0] == turn.server[0]
            and from_addr[1] == turn.server[1]
        ):
            # Fast path for the relayed data stream: the same checks as classify() (RFC 8656
            # §12.4), without building intermediate objects.
            length = len(data) - 4
            if length >= 0 and 0 <= length - (data[2] << 8 | data[3]) <= 3:
                if (data[0] << 8 | data[1]) != turn.channel or turn.peer is None:
                    self.counters.turn_channel_drop += 1
                    return None
                return data[4 : 4 + (data[2] << 8 | data[3])], turn.peer
        result = classify(data, from_addr, transactions=self._transactions, turn_server=server)
        kind = result.kind
        if kind is DatagramKind.OTHER:
            host, port = from_addr[0], from_addr[1]
            assert isinstance(host, str) and isinstance(port, int)
            return data, (host, port)
        if kind is DatagramKind.CHANNEL_DATA:
            assert turn is not None and turn.peer is not None
            if result.channel != turn.channel or turn.state not in (
                TurnState.READY,
                TurnState.ALLOCATED,
            ):
                self.counters.turn_channel_drop += 1
                return None
            return result.payload, turn.peer
        if kind is DatagramKind.STRAY:
            setattr(
                self.counters, result.drop_reason, getattr(self.counters, result.drop_reason) + 1
            )
            return None
        message = result.message
        assert message is not None
        if message.cls is MessageClass.INDICATION:
            relayed = turn.handle_indication(message) if turn is not None else None
            if relayed is None:
                self.counters.turn_indication_drop += 1
            return relayed
        if not self._transactions.dispatch(message, now):
            self.counters.stun_rejected_drop += 1
        return None

    def wrap(self, data: bytes, to_addr: Address) -> tuple[bytes, Address]:
        """Address an outgoing OSTP datagram: ChannelData to the TURN server when relaying to
        ``to_addr``, the datagram itself to ``to_addr`` otherwise."""
        turn = self.turn
        if turn is not None and turn.ready and turn.peer is not None and _same(to_addr, turn.peer):
            return turn.wrap(data), turn.server
        return data, to_addr

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """STUN/TURN requests and retransmissions due now."""
        return self._transactions.datagrams_to_send()

    def next_event(self) -> NatEvent | None:
        return self._events.popleft() if self._events else None

    # --- timers ---------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest absolute deadline (retransmission or refresh), or None."""
        deadlines = [self._transactions.get_timer()]
        if self.turn is not None:
            deadlines.append(self.turn.get_timer())
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> None:
        self._transactions.handle_timer(now)
        if self.turn is not None:
            self.turn.handle_timer(now)
