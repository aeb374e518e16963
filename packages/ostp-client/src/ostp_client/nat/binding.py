"""STUN Binding client: learn the server-reflexive address of the socket (RFC 8489 §3)."""

from __future__ import annotations

from collections.abc import Callable

from ostp_client.nat.errors import StunParseError
from ostp_client.nat.events import BindingFailed, BindingSucceeded, NatEvent
from ostp_client.nat.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    decode_error_code,
    decode_xor_address,
    encode_message,
)
from ostp_client.nat.transaction import Transaction, TransactionTable
from ostp_proto.address import format_sockaddr

Address = tuple[str, int]


class BindingClient:
    """Sends Binding requests through a shared :class:`TransactionTable`."""

    def __init__(self, transactions: TransactionTable, emit: Callable[[NatEvent], None]) -> None:
        self._transactions = transactions
        self._emit = emit
        self.mapped_address: Address | None = None

    def start(self, server: Address, now: float) -> bytes:
        """Send a Binding request to ``server``; returns its transaction id."""
        tid = self._transactions.new_id()
        request = encode_message(Method.BINDING, MessageClass.REQUEST, tid, fingerprint=True)
        self._transactions.start(tid, request, server, self, context=server, now=now)
        return tid

    def on_response(self, transaction: Transaction, message: StunMessage, now: float) -> bool:
        server = transaction.destination
        if message.method != Method.BINDING or message.cls == MessageClass.REQUEST:
            return False
        if message.cls == MessageClass.ERROR:
            try:
                code, reason = decode_error_code(message.get(Attr.ERROR_CODE) or b"")
                text = f"{code} {reason}".strip()
            except StunParseError:
                text = "an error response without a valid ERROR-CODE"
            self._emit(
                BindingFailed(server, f"STUN server {format_sockaddr(server)} answered {text}")
            )
            return True
        if message.cls != MessageClass.SUCCESS:
            return False
        value = message.get(Attr.XOR_MAPPED_ADDRESS)
        try:
            if value is None:
                raise StunParseError("no XOR-MAPPED-ADDRESS")
            mapped = decode_xor_address(value, message.transaction_id)
        except StunParseError:
            return False  # RFC 8489 §14.2: a success without a mapped address is not usable
        self.mapped_address = mapped
        self._emit(BindingSucceeded(server, mapped))
        return True

    def on_timeout(self, transaction: Transaction, now: float) -> None:
        server = transaction.destination
        waited = now - transaction.started
        self._emit(
            BindingFailed(
                server,
                f"STUN server {format_sockaddr(server)} did not answer "
                f"({transaction.transmissions} Binding requests over {waited:.1f} s)",
            )
        )
