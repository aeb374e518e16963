"""STUN client transactions over UDP: retransmission and timeout (RFC 8489 §6.2.1).

A request is sent at t=0 and retransmitted after RTO, 2·RTO, 4·RTO, ... until Rc
transmissions; after the last one the client waits Rm·RTO before declaring a timeout
(defaults 500 ms, 7, 16: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; gives up at 39.5 s).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ostp_client.nat.config import NatConfig
from ostp_client.nat.stun import TRANSACTION_ID_SIZE, StunMessage

Address = tuple[str, int]


class TransactionOwner(Protocol):
    """Who started a transaction gets its answer or its timeout."""

    def on_response(self, transaction: Transaction, message: StunMessage, now: float) -> bool:
        """Handle an answer; return False to reject it (e.g. bad MESSAGE-INTEGRITY) and keep
        waiting for the genuine one."""

    def on_timeout(self, transaction: Transaction, now: float) -> None:
        """No answer after Rc transmissions and Rm·RTO."""


@dataclass(slots=True)
class Transaction:
    """One outstanding request."""

    transaction_id: bytes
    request: bytes
    destination: Address
    owner: TransactionOwner
    context: object
    """Whatever the owner needs to resume (the request's purpose and attributes)."""
    rto: float
    transmissions: int
    deadline: float
    started: float


class TransactionTable:
    """All outstanding STUN requests of one socket, shared by the Binding and TURN clients."""

    def __init__(self, config: NatConfig, urandom: Callable[[int], bytes] = os.urandom) -> None:
        self._config = config
        self._urandom = urandom
        self._pending: dict[bytes, Transaction] = {}
        self._outbox: list[tuple[bytes, Address]] = []

    def new_id(self) -> bytes:
        """A fresh random transaction id, not equal to any outstanding one (RFC 8489 §5)."""
        while True:
            tid = self._urandom(TRANSACTION_ID_SIZE)
            if tid not in self._pending:
                return tid

    def __contains__(self, transaction_id: object) -> bool:
        return transaction_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def start(
        self,
        transaction_id: bytes,
        request: bytes,
        destination: Address,
        owner: TransactionOwner,
        *,
        context: object,
        now: float,
    ) -> Transaction:
        """Register ``request`` (already encoded with ``transaction_id``) and send it."""
        transaction = Transaction(
            transaction_id=transaction_id,
            request=request,
            destination=destination,
            owner=owner,
            context=context,
            rto=self._config.rto,
            transmissions=1,
            deadline=now + self._config.rto,
            started=now,
        )
        if self._config.rc <= 1:
            transaction.deadline = now + self._config.rm * self._config.rto
        self._pending[transaction_id] = transaction
        self._outbox.append((request, destination))
        return transaction

    def dispatch(self, message: StunMessage, now: float) -> bool:
        """Hand a response to its transaction's owner; True if it was accepted and closed it."""
        transaction = self._pending.get(message.transaction_id)
        if transaction is None:
            return False
        if not transaction.owner.on_response(transaction, message, now):
            return False
        self._pending.pop(message.transaction_id, None)
        return True

    def cancel_owner(self, owner: TransactionOwner) -> None:
        """Forget every transaction of ``owner`` (it failed or closed)."""
        for tid in [t for t, tr in self._pending.items() if tr.owner is owner]:
            del self._pending[tid]

    def get_timer(self) -> float | None:
        if not self._pending:
            return None
        return min(t.deadline for t in self._pending.values())

    def handle_timer(self, now: float) -> None:
        """Retransmit what is due; time out what has been retransmitted Rc times."""
        config = self._config
        for transaction in sorted(self._pending.values(), key=lambda t: t.deadline):
            if transaction.deadline > now:
                continue
            if transaction.transmissions >= config.rc:
                if self._pending.pop(transaction.transaction_id, None) is not None:
                    transaction.owner.on_timeout(transaction, now)
                continue
            transaction.transmissions += 1
            transaction.rto *= 2
            self._outbox.append((transaction.request, transaction.destination))
            if transaction.transmissions >= config.rc:
                transaction.deadline = now + config.rm * config.rto
            else:
                transaction.deadline = now + transaction.rto

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out
