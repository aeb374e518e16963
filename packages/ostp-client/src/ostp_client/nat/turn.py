"""TURN client over UDP with long-term credentials (RFC 8656, RFC 5766), for one peer.

Life of a relay: Allocate (401 challenge, then again with USERNAME/REALM/NONCE/MESSAGE-INTEGRITY)
-> CreatePermission + ChannelBind for the peer -> :class:`RelayReady`; from then on
:meth:`TurnClient.wrap` frames datagrams as ChannelData. The allocation is refreshed at
``refresh_fraction`` of its lifetime, the permission every ``permission_refresh`` seconds
(< 300 s) and the channel every ``channel_refresh`` seconds (< 600 s). :meth:`TurnClient.close`
sends Refresh with LIFETIME 0.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ostp_client.nat.config import TurnConfig
from ostp_client.nat.errors import LocalNatError, StunParseError
from ostp_client.nat.events import (
    AllocationSucceeded,
    NatEvent,
    RelayReady,
    TurnClosed,
    TurnFailed,
    TurnFailure,
    TurnRefreshed,
)
from ostp_client.nat.stun import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    Attr,
    MessageClass,
    Method,
    StunMessage,
    decode_error_code,
    decode_text,
    decode_u32,
    decode_xor_address,
    encode_channel_data,
    encode_channel_number,
    encode_message,
    encode_requested_transport,
    encode_u32,
    encode_xor_address,
    long_term_key,
)
from ostp_client.nat.transaction import Transaction, TransactionTable
from ostp_proto.address import format_sockaddr

Address = tuple[str, int]

DEFAULT_LIFETIME = 600  # RFC 8656 §3.2: the default allocation lifetime
PERMISSION_LIFETIME = 300  # RFC 8656 §9
CHANNEL_LIFETIME = 600  # RFC 8656 §12

# RFC 8656 §6.4 and §18.9: the answers that mean "no allocation for you".
_REFUSALS = {
    403: "forbidden by the server's policy",
    437: "an allocation already exists for this socket (allocation mismatch)",
    440: "address family not supported",
    441: "wrong credentials for the existing allocation",
    442: "UDP relaying not supported",
    486: "the user's allocation quota is reached",
    508: "the server has no capacity for another allocation",
}


class TurnState(enum.Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class _Purpose(enum.Enum):
    ALLOCATE = "Allocate"
    REFRESH = "Refresh"
    PERMISSION = "CreatePermission"
    CHANNEL = "ChannelBind"
    DEALLOCATE = "Refresh (LIFETIME 0)"


_METHODS = {
    _Purpose.ALLOCATE: Method.ALLOCATE,
    _Purpose.REFRESH: Method.REFRESH,
    _Purpose.PERMISSION: Method.CREATE_PERMISSION,
    _Purpose.CHANNEL: Method.CHANNEL_BIND,
    _Purpose.DEALLOCATE: Method.REFRESH,
}


@dataclass(slots=True)
class _Request:
    purpose: _Purpose
    authenticated: bool
    stale_retries: int = 0


class TurnClient:
    """The TURN state machine. It never owns a socket: requests go through the shared
    :class:`TransactionTable`, events through ``emit``."""

    def __init__(
        self,
        config: TurnConfig,
        transactions: TransactionTable,
        emit: Callable[[NatEvent], None],
    ) -> None:
        if not CHANNEL_MIN <= config.channel <= CHANNEL_MAX:
            raise LocalNatError("TURN channel number must be within 0x4000-0x4FFF")
        self.config = config
        self.server: Address = (config.server[0], config.server[1])
        self.state = TurnState.IDLE
        self.peer: Address | None = None
        self.relayed_address: Address | None = None
        self.mapped_address: Address | None = None
        self.lifetime = 0
        self.stale_nonce_retries = 0
        """How many requests were resent after 438 (Stale Nonce)."""
        self._transactions = transactions
        self._emit = emit
        self._realm: str | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._permission_ok = False
        self._channel_ok = False
        self._refresh_at: float | None = None
        self._permission_at: float | None = None
        self._channel_at: float | None = None
        self._handlers: dict[_Purpose, Callable[[StunMessage, float], None]] = {
            _Purpose.ALLOCATE: self._allocated,
            _Purpose.REFRESH: self._refreshed,
            _Purpose.PERMISSION: self._permission_installed,
            _Purpose.CHANNEL: self._channel_bound,
            _Purpose.DEALLOCATE: self._deallocated,
        }

    # --- public API ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when datagrams to the peer travel as ChannelData."""
        return self.state is TurnState.READY

    @property
    def channel(self) -> int:
        return self.config.channel

    def allocate(self, peer: Address, now: float) -> None:
        """Start: Allocate, then permission and channel for ``peer`` (a literal IP address)."""
        if self.state is not TurnState.IDLE:
            raise LocalNatError(f"TURN allocate() called in state {self.state.value}")
        self.peer = (peer[0], peer[1])
        self.state = TurnState.ALLOCATING
        self._send(_Request(_Purpose.ALLOCATE, authenticated=False), now)

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with LIFETIME 0, RFC 8656 §7)."""
        if self.state in (TurnState.ALLOCATED, TurnState.READY):
            self._transactions.cancel_owner(self)
            self.state = TurnState.CLOSING
            self._refresh_at = self._permission_at = self._channel_at = None
            self._send(_Request(_Purpose.DEALLOCATE, authenticated=True), now)
        elif self.state in (TurnState.IDLE, TurnState.ALLOCATING):
            self._transactions.cancel_owner(self)
            self.state = TurnState.CLOSED
            self._emit(TurnClosed(deallocated=False))

    def wrap(self, data: bytes) -> bytes:
        """Frame a datagram for the peer as ChannelData (to be sent to :attr:`server`)."""
        if self.state is not TurnState.READY:
            raise LocalNatError(f"TURN relay not ready (state {self.state.value})")
        return encode_channel_data(self.config.channel, data, pad=self.config.pad_channel_data)

    def handle_indication(self, message: StunMessage) -> tuple[bytes, Address] | None:
        """A Data indication from the server (RFC 8656 §11.6): (payload, peer) or None."""
        if message.method != Method.DATA or message.cls != MessageClass.INDICATION:
            return None
        if self.state not in (TurnState.ALLOCATED, TurnState.READY):
            return None
        peer_value = message.get(Attr.XOR_PEER_ADDRESS)
        data = message.get(Attr.DATA)
        if peer_value is None or data is None:
            return None
        try:
            peer = decode_xor_address(peer_value, message.transaction_id)
        except StunParseError:
            return None
        if peer != self.peer:
            return None
        return data, peer

    def get_timer(self) -> float | None:
        deadlines = [
            t for t in (self._refresh_at, self._permission_at, self._channel_at) if t is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._send(_Request(_Purpose.REFRESH, authenticated=True), now)
        if self._permission_at is not None and now >= self._permission_at:
            self._permission_at = None
            self._send(_Request(_Purpose.PERMISSION, authenticated=True), now)
        if self._channel_at is not None and now >= self._channel_at:
            self._channel_at = None
            self._send(_Request(_Purpose.CHANNEL, authenticated=True), now)

    # --- requests -----------------------------------------------------------------------------

    def _attributes(self, purpose: _Purpose, tid: bytes) -> list[tuple[int, bytes]]:
        attrs: list[tuple[int, bytes]] = []
        if self.config.software:
            attrs.append((Attr.SOFTWARE, self.config.software.encode("utf-8")))
        if purpose is _Purpose.ALLOCATE:
            attrs.append((Attr.REQUESTED_TRANSPORT, encode_requested_transport()))
            if self.config.lifetime is not None:
                attrs.append((Attr.LIFETIME, encode_u32(self.config.lifetime)))
        elif purpose is _Purpose.REFRESH:
            if self.config.lifetime is not None:
                attrs.append((Attr.LIFETIME, encode_u32(self.config.lifetime)))
        elif purpose is _Purpose.DEALLOCATE:
            attrs.append((Attr.LIFETIME, encode_u32(0)))
        elif purpose is _Purpose.PERMISSION:
            assert self.peer is not None
            attrs.append((Attr.XOR_PEER_ADDRESS, encode_xor_address(self.peer, tid)))
        else:
            assert self.peer is not None
            attrs.append((Attr.CHANNEL_NUMBER, encode_channel_number(self.config.channel)))
            attrs.append((Attr.XOR_PEER_ADDRESS, encode_xor_address(self.peer, tid)))
        return attrs

    def _send(self, request: _Request, now: float) -> None:
        tid = self._transactions.new_id()
        attrs = self._attributes(request.purpose, tid)
        key = None
        if request.authenticated:
            if self._key is None or self._realm is None or self._nonce is None:
                raise LocalNatError("authenticated TURN request before the 401 challenge")
            attrs += [
                (Attr.USERNAME, self.config.username.encode("utf-8")),
                (Attr.REALM, self._realm.encode("utf-8")),
                (Attr.NONCE, self._nonce),
            ]
            key = self._key
        data = encode_message(
            _METHODS[request.purpose], MessageClass.REQUEST, tid, attrs, integrity_key=key
        )
        self._transactions.start(tid, data, self.server, self, context=request, now=now)

    # --- answers ------------------------------------------------------------------------------

    def on_response(self, transaction: Transaction, message: StunMessage, now: float) -> bool:
        request = transaction.context
        assert isinstance(request, _Request)
        if message.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            return False
        if message.method != _METHODS[request.purpose]:
            return False
        if message.has_integrity:
            if self._key is None or not message.verify_integrity(self._key):
                return False  # RFC 8489 §9.2.5: discard, keep waiting for the genuine answer
        elif request.authenticated and message.cls is MessageClass.SUCCESS:
            return False  # a success to an authenticated request must be authenticated
        if message.cls is MessageClass.SUCCESS:
            try:
                self._handlers[request.purpose](message, now)
            except StunParseError as exc:
                self._fail(
                    TurnFailure.PROTOCOL,
                    f"malformed {request.purpose.value} answer from "
                    f"TURN server {format_sockaddr(self.server)}: {exc}",
                    None,
                )
            return True
        try:
            code, reason = decode_error_code(message.get(Attr.ERROR_CODE) or b"")
        except StunParseError:
            code, reason = 0, ""
        self._on_error(request, message, code, reason, now)
        return True

    def on_timeout(self, transaction: Transaction, now: float) -> None:
        request = transaction.context
        assert isinstance(request, _Request)
        waited = now - transaction.started
        if request.purpose is _Purpose.DEALLOCATE:
            self.state = TurnState.CLOSED
            self._emit(TurnClosed(deallocated=False))
        elif request.purpose is _Purpose.ALLOCATE:
            self._fail(
                TurnFailure.UNREACHABLE,
                f"TURN server {format_sockaddr(self.server)} is unreachable: no answer to "
                f"{transaction.transmissions} Allocate requests over {waited:.1f} s",
                None,
            )
        else:
            self._fail(
                TurnFailure.ALLOCATION_LOST,
                f"TURN server {format_sockaddr(self.server)} stopped answering "
                f"({request.purpose.value} timed out after {waited:.1f} s)",
                None,
            )

    def _on_error(
        self, request: _Request, message: StunMessage, code: int, reason: str, now: float
    ) -> None:
        text = f"{code} {reason}".strip() if code else "an error without ERROR-CODE"
        if code == 401 and not request.authenticated:
            # RFC 8489 §9.2.4: the challenge. Take REALM and NONCE and retry with credentials.
            realm, nonce = message.get(Attr.REALM), message.get(Attr.NONCE)
            if realm is None or nonce is None:
                self._fail(
                    TurnFailure.PROTOCOL,
                    f"TURN server {format_sockaddr(self.server)} sent 401 without REALM and NONCE",
                    code,
                )
                return
            try:
                self._realm = decode_text(realm)
            except StunParseError:
                self._fail(TurnFailure.PROTOCOL, "TURN REALM is not UTF-8", code)
                return
            self._nonce = nonce
            self._key = long_term_key(self.config.username, self._realm, self.config.password)
            self._send(_Request(request.purpose, authenticated=True), now)
            return
        if code == 438 and request.authenticated:
            # RFC 8489 §9.2.5: stale nonce; retry with the new one (and the new realm, if any).
            nonce = message.get(Attr.NONCE)
            if nonce is None or request.stale_retries >= self.config.max_stale_nonce_retries:
                self._fail_request(request, f"the server keeps answering {text}", code)
                return
            self._nonce = nonce
            self.stale_nonce_retries += 1
            realm = message.get(Attr.REALM)
            if realm is not None:
                try:
                    self._realm = decode_text(realm)
                except StunParseError:
                    self._fail(TurnFailure.PROTOCOL, "TURN REALM is not UTF-8", code)
                    return
                self._key = long_term_key(self.config.username, self._realm, self.config.password)
            retry = _Request(
                request.purpose, authenticated=True, stale_retries=request.stale_retries + 1
            )
            self._send(retry, now)
            return
        if code == 401:
            self._fail(
                TurnFailure.WRONG_CREDENTIALS,
                f"TURN server {format_sockaddr(self.server)} rejected the credentials of user "
                f"{self.config.username!r} ({text}): check the TURN username and password",
                code,
            )
            return
        self._fail_request(request, text, code)

    def _fail_request(self, request: _Request, text: str, code: int) -> None:
        purpose = request.purpose
        server = format_sockaddr(self.server)
        if purpose is _Purpose.ALLOCATE:
            why = _REFUSALS.get(code, "refused")
            self._fail(
                TurnFailure.ALLOCATION_REFUSED,
                f"TURN server {server} refused the allocation: {why} ({text})",
                code,
            )
        elif purpose is _Purpose.DEALLOCATE:
            self.state = TurnState.CLOSED
            self._emit(TurnClosed(deallocated=code == 437))  # 437: already gone
        elif purpose is _Purpose.REFRESH:
            self._fail(
                TurnFailure.ALLOCATION_LOST,
                f"TURN server {server} refused to refresh the allocation ({text})",
                code,
            )
        else:
            peer = format_sockaddr(self.peer) if self.peer else "?"
            self._fail(
                TurnFailure.PROTOCOL,
                f"TURN server {server} refused {purpose.value} for peer {peer} ({text})",
                code,
            )

    def _fail(self, reason: TurnFailure, message: str, code: int | None) -> None:
        self._transactions.cancel_owner(self)
        self._refresh_at = self._permission_at = self._channel_at = None
        self.state = TurnState.FAILED
        self._emit(TurnFailed(reason, message, code))

    # --- successes ----------------------------------------------------------------------------

    def _schedule_refresh(self, now: float) -> None:
        self._refresh_at = now + self.lifetime * self.config.refresh_fraction

    def _allocated(self, message: StunMessage, now: float) -> None:
        relayed = message.get(Attr.XOR_RELAYED_ADDRESS)
        if relayed is None:
            raise StunParseError("Allocate success without XOR-RELAYED-ADDRESS")
        self.relayed_address = decode_xor_address(relayed, message.transaction_id)
        mapped = message.get(Attr.XOR_MAPPED_ADDRESS)
        if mapped is not None:
            self.mapped_address = decode_xor_address(mapped, message.transaction_id)
        lifetime = message.get(Attr.LIFETIME)
        self.lifetime = decode_u32(lifetime) if lifetime is not None else DEFAULT_LIFETIME
        self.state = TurnState.ALLOCATED
        self._schedule_refresh(now)
        self._emit(AllocationSucceeded(self.relayed_address, self.mapped_address, self.lifetime))
        self._send(_Request(_Purpose.PERMISSION, authenticated=True), now)
        self._send(_Request(_Purpose.CHANNEL, authenticated=True), now)

    def _refreshed(self, message: StunMessage, now: float) -> None:
        lifetime = message.get(Attr.LIFETIME)
        self.lifetime = decode_u32(lifetime) if lifetime is not None else DEFAULT_LIFETIME
        self._schedule_refresh(now)
        self._emit(TurnRefreshed("allocation", self.lifetime))

    def _permission_installed(self, message: StunMessage, now: float) -> None:
        self._permission_at = now + self.config.permission_refresh
        first = not self._permission_ok
        self._permission_ok = True
        if first:
            self._maybe_ready()
        else:
            self._emit(TurnRefreshed("permission", PERMISSION_LIFETIME))

    def _channel_bound(self, message: StunMessage, now: float) -> None:
        self._channel_at = now + self.config.channel_refresh
        first = not self._channel_ok
        self._channel_ok = True
        if first:
            self._maybe_ready()
        else:
            self._emit(TurnRefreshed("channel", CHANNEL_LIFETIME))

    def _maybe_ready(self) -> None:
        if self._permission_ok and self._channel_ok and self.state is TurnState.ALLOCATED:
            assert self.peer is not None and self.relayed_address is not None
            self.state = TurnState.READY
            self._emit(RelayReady(self.peer, self.config.channel, self.relayed_address))

    def _deallocated(self, message: StunMessage, now: float) -> None:
        self.state = TurnState.CLOSED
        self._emit(TurnClosed(deallocated=True))
