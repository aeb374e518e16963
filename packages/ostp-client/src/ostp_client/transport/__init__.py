"""How an OSTP session's datagrams reach the server: the datagram transports (spec §10.6).

The session (``ostp_client.outbounds.ostp``) drives one :class:`DatagramTransport` at a time and
does not care which: it reads every datagram waiting, feeds the core, and hands the core's
output back in one call. Two kinds exist:

* :class:`~ostp_client.transport.udp.UdpTransport`: one UDP socket, connected (GSO/GRO batching)
  or shared with STUN/TURN (:class:`~ostp_client.transport.udp.NatSocket`); datagrams may be lost.
* :class:`~ostp_client.transport.stream.StreamTransport`: one TCP connection after the xHTTP
  opening (``/stream``, ``/wss``, optionally inside Reality), datagrams framed; nothing is lost
  or reordered while the connection lives (``reliable``), so the session runs its ARQ with
  ``reliable_transport``.

A session may move between them on the same OSTP session (``auto``: roaming, spec §9.2).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

from ostp_client.errors import OstpClientError

__all__ = ["DatagramTransport", "TransportError"]


class TransportError(OstpClientError, OSError):
    """A transport could not be opened (the server refused, the opening timed out, ...)."""


class DatagramTransport(Protocol):
    """What a session needs from the path to its server."""

    kind: str
    """``udp``, ``tcp``, ``wss`` or ``reality`` (shown in the status)."""
    reliable: bool
    """Datagrams arrive in order and without loss while the transport lives (TCP)."""
    sock: socket.socket
    """Readable when :meth:`recv_batch` has something (the session sleeps on it)."""
    failure: str | None
    """Why the transport ended (the peer closed the TCP connection, ...); None while it lives."""

    @property
    def blocked(self) -> bool:
        """True while output is backed up: the session takes nothing more from its core."""
        ...

    def recv_batch(self, limit: int = 256) -> Iterable[bytes]:
        """Every whole datagram waiting (at most ``limit`` system calls); empty when none.

        UDP reads as the result is consumed (each datagram is handled while still in the
        cache), so take it in one loop before waiting again."""
        ...

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        """Send ``datagrams`` in order; the datagram bytes sent (or queued, for TCP)."""
        ...

    def close(self) -> None:
        """Release the socket (idempotent); nothing is sent afterwards."""
        ...
