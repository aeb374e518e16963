"""The UDP transport: OSTP datagrams on one UDP socket (spec §10.1, §10.6 ``udp``).

A session that talks only to its server keeps a connected socket with GSO/GRO batching
(:class:`ostp_sockets.BatchSocket`). A session that also talks to STUN or TURN servers
keeps it unconnected and sorts what it reads with a :class:`~ostp_client.nat.NatMux`
(:class:`NatSocket`). Either way losses are the ARQ's business: a full kernel buffer or an ICMP
error counts as loss on the wire.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ostp_client.nat import NatMux
from ostp_client.net.bypass import apply_bypass
from ostp_sockets import BatchSocket, SocketBuffers, set_buffers, set_dont_fragment

__all__ = ["SOCKET_BUFFER", "NatSocket", "UdpTransport", "open_udp_socket"]

SOCKET_BUFFER = 32 * 1024 * 1024  # upstream asks for 32 MiB (spec §9.1, §16)


def open_udp_socket(
    family: int, buffer_size: int = SOCKET_BUFFER
) -> tuple[socket.socket, SocketBuffers]:
    """A non-blocking UDP socket of ``family`` routed around any TUN, with ``buffer_size``
    bytes of buffers asked for; the socket and what the kernel granted (it caps the request at
    ``net.core.rmem_max`` without CAP_NET_ADMIN)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        apply_bypass(sock)  # with a TUN's policy routing, never route the tunnel into itself
        buffers = set_buffers(sock, buffer_size)
    except BaseException:
        sock.close()
        raise
    return sock, buffers


class NatSocket(BatchSocket):
    """The session socket when it also talks STUN/TURN: a BatchSocket, unconnected.

    Every datagram read goes through the NatMux, which keeps STUN answers and unwraps TURN
    ChannelData; what it hands back is passed on only if it comes from the OSTP server (directly
    or through the relay). OSTP datagrams leave addressed to the server, or as ChannelData to the
    TURN server while relaying; with ``relay_only`` nothing leaves directly (before the relay is
    ready or after it failed). GSO and GRO work on unconnected sockets as on connected ones.
    """

    def __init__(
        self,
        sock: socket.socket,
        mux: NatMux,
        server: tuple[str, int],
        *,
        relay_only: bool,
        gso: bool = True,
        gro: bool = True,
    ) -> None:
        super().__init__(sock, gso=gso, gro=gro)
        self.mux = mux
        self.server = server
        self.relay_only = relay_only
        self.source_drop = 0
        """Datagrams for the OSTP layer that came from neither the server nor the relay."""
        self.unrelayed_drop = 0
        """OSTP datagrams not sent because the relay they need is not (or no longer) ready."""

    def recv_batch(self, limit: int = 256) -> Iterator[bytes]:
        """The OSTP datagrams among everything waiting (up to ``limit`` system calls)."""
        receive = self.mux.receive_datagram
        host, port = self.server[0], self.server[1]
        now = time.monotonic()
        for part, addr in self.recv_from_batch(limit):
            got = receive(part, addr, now)
            if got is None:
                continue
            payload, peer = got
            if peer[0] == host and peer[1] == port:
                yield payload
            else:
                self.source_drop += 1

    def send_batch(self, datagrams: Sequence[bytes], to: Any = None) -> int:
        """Send OSTP datagrams in order to the server (or through the relay); the bytes sent."""
        turn = self.mux.turn
        if turn is not None and turn.ready:
            wrap = turn.wrap
            wrapped = [wrap(d) for d in datagrams]
            refused = len(self.refused)
            sent = super().send_batch(wrapped, turn.server)
            if len(self.refused) > refused:  # report the OSTP datagrams' own sizes
                own = {len(w): len(d) for w, d in zip(wrapped, datagrams, strict=True)}
                self.refused[refused:] = [own.get(r, r) for r in self.refused[refused:]]
            return sent
        if self.relay_only:
            self.unrelayed_drop += len(datagrams)
            return 0
        return super().send_batch(datagrams, self.server)

    def send_nat(self, now: float) -> None:
        """Send the STUN/TURN requests the mux has queued (losses are its retransmissions' job)."""
        sock = self.sock
        for data, to in self.mux.datagrams_to_send(now):
            with contextlib.suppress(OSError):
                sock.sendto(data, to)


class UdpTransport:
    """A :class:`~ostp_client.transport.DatagramTransport` over a BatchSocket or NatSocket."""

    kind = "udp"
    reliable = False
    blocked = False

    def __init__(self, batch: BatchSocket, buffers: SocketBuffers | None = None) -> None:
        self.batch = batch
        self.sock = batch.sock
        self.buffers = buffers
        """What the kernel granted for the socket's buffers (shown in the status)."""
        self.failure: str | None = None
        self.dont_fragment = set_dont_fragment(batch.sock)
        """Datagrams leave with DF set, never fragmented: path MTU discovery sizes them (and
        :attr:`BatchSocket.refused` lists those too large for the first hop)."""

    def recv_batch(self, limit: int = 256) -> Iterator[bytes]:
        # ICMP errors (the server's port closed) are skipped: the server may come back
        return self.batch.recv_batch(limit)

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        return self.batch.send_batch(datagrams)

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on this socket (a full receive buffer); None: unknown."""
        return self.batch.kernel_drops()

    def close(self) -> None:
        self.sock.close()
