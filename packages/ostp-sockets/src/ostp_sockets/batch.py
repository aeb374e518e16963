"""Batched UDP I/O: GSO on send and GRO on receive where Linux offers them.

The system call per datagram, not the cipher, bounds a Python UDP tunnel, so runs of equal-size
datagrams leave in one ``sendmsg`` with ``UDP_SEGMENT`` (the kernel cuts the buffer; only the
last segment may be shorter) and coalesced buffers read with ``UDP_GRO`` are split again every
``gso_size`` bytes. Where Linux does not offer them, or the kernel refuses GSO, one datagram per
call is used; both paths are tested.

One class serves both programs: the client's session socket is connected
(:meth:`BatchSocket.recv_batch`, :meth:`BatchSocket.send_batch` without an address), the
server's listen socket talks to many peers (:meth:`BatchSocket.recv_from_batch` gives each
datagram's source, ``send_batch(datagrams, to)`` addresses them).

Datagrams leave with DF set and never fragmented (:func:`ostp_sockets.set_dont_fragment`): path
MTU discovery sizes them, and one too large for the first hop is refused with ``EMSGSIZE``,
which :attr:`BatchSocket.refused` reports to the owner.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from .buffers import proc_udp_drops

__all__ = ["MAX_GSO_BYTES", "MAX_SEGMENTS", "RECV_BUFFER", "UDP_GRO", "UDP_SEGMENT", "BatchSocket"]

UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104  # linux/udp.h
SO_RXQ_OVFL = 40  # asm-generic/socket.h: the socket's drop count comes with each datagram
MAX_SEGMENTS = 64  # the kernel allows up to 128 (UDP_MAX_SEGMENTS); half keeps bursts short
MAX_GSO_BYTES = 65000  # one sendmsg carries at most 64 KiB of payload
RECV_BUFFER = 65535  # a coalesced buffer is up to 64 KiB: never read one with less
# room for two items: the GRO segment size and the drop counter
_ANC_SPACE = 2 * socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_NATIVE_INT = struct.Struct("=i")


class BatchSocket:
    """A non-blocking UDP socket, connected or not, with GSO/GRO where the kernel has them.

    ``gso``/``gro``: use them if offered (off: one datagram per call). ``count_drops``: ask the
    kernel for its drop counter with every datagram (``SO_RXQ_OVFL``, read by
    :meth:`kernel_drops`; it costs an ancillary item per read). ``skip_errors``: a receive error
    is never raised, only skipped (a listening socket serves many peers and its loop must not
    end); otherwise only ``ConnectionRefusedError`` is skipped (an ICMP error for an earlier
    datagram of a connected socket: the peer may come back) and other errors reach the owner.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        gso: bool = True,
        gro: bool = True,
        count_drops: bool = True,
        skip_errors: bool = False,
    ) -> None:
        self.sock = sock
        self.gso = gso and sys.platform == "linux"
        """Runs of equal-size datagrams leave in one call; False once the kernel refused."""
        self.gro = False
        if gro and sys.platform == "linux":
            try:
                sock.setsockopt(_SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                self.gro = False
        self.gso_failures = 0
        """Times the kernel refused GSO itself (then :attr:`gso` is off)."""
        self.refused: list[int] = []
        """Sizes of datagrams the kernel refused as larger than the first hop (``EMSGSIZE``);
        the owner reports them to its connection and clears the list."""
        self.send_drop = 0
        """Datagrams not handed to the kernel (a full buffer, an ICMP error, ``EMSGSIZE``, no
        route): lost as on the wire, the ARQ's business."""
        self.drops_reported = 0
        """The kernel's count of datagrams it dropped for this socket (a full receive buffer),
        as last reported with a datagram (``SO_RXQ_OVFL``); see :meth:`kernel_drops`."""
        self._skipped: type[OSError] = OSError if skip_errors else ConnectionRefusedError
        self._rxq_ovfl = False
        if count_drops and self.gro:  # only the recvmsg path sees ancillary data
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
                self._rxq_ovfl = True
            except OSError:
                pass

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped for this socket so far (None: cannot be known here).

        The counter that comes with each datagram lags until the next one arrives; the
        socket's line in ``/proc/net/udp`` is current, so it is preferred when readable.
        Called for status only, never per datagram.
        """
        current = proc_udp_drops(self.sock)
        if current is not None:
            return max(current, self.drops_reported)
        return self.drops_reported if self._rxq_ovfl else None

    # -- receive -------------------------------------------------------------------------------

    def recv_batch(self, limit: int = 256) -> Iterator[bytes]:
        """A connected socket's datagrams, every one waiting (up to ``limit`` system calls).

        An iterator, read as it is consumed: each datagram is handled while it is still in the
        CPU's cache (reading the whole batch into a list first cost twice the CPU per datagram
        at 1,452 bytes on loopback, five times at 64 KB). Consume it before waiting again."""
        return self._receive(limit, False)

    def recv_from_batch(self, limit: int = 256) -> Iterator[tuple[bytes, Any]]:
        """An unconnected socket's datagrams as ``(datagram, source)`` pairs, as
        :meth:`recv_batch`."""
        return self._receive(limit, True)

    def _receive(self, limit: int, sources: bool) -> Iterator[Any]:
        sock = self.sock
        skipped = self._skipped
        if not self.gro:
            recv = sock.recvfrom if sources else sock.recv  # recvfrom's pair is the item
            for _ in range(limit):
                try:
                    got = recv(RECV_BUFFER)
                except (BlockingIOError, InterruptedError):
                    return
                except skipped:
                    continue
                yield got
            return
        recvmsg = sock.recvmsg
        ancdata: list[tuple[int, int, bytes]] = []
        for _ in range(limit):
            try:
                data, ancdata, _flags, source = recvmsg(RECV_BUFFER, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except skipped:
                continue
            segment = 0
            for level, kind, value in ancdata:
                if kind == UDP_GRO and level == _SOL_UDP:
                    segment = _NATIVE_INT.unpack_from(value)[0]
            if segment and len(data) > segment:
                # coalesced: one datagram every `segment` bytes, the last one may be shorter
                view = memoryview(data)
                for start in range(0, len(data), segment):
                    part = bytes(view[start : start + segment])
                    yield (part, source) if sources else part
            else:
                yield (data, source) if sources else data
        if ancdata and self._rxq_ovfl:
            self._note_drops(ancdata)  # once per batch: the last datagram's count is newest

    def _note_drops(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, value in ancdata:
            if kind == SO_RXQ_OVFL and level == socket.SOL_SOCKET:
                self.drops_reported = _U32.unpack_from(value)[0]

    # -- send ----------------------------------------------------------------------------------

    def send_batch(self, datagrams: Sequence[bytes], to: Any = None) -> int:
        """Send ``datagrams`` in order (to ``to``, or on a connected socket); the bytes sent.

        What the kernel does not take is lost as on the wire (:attr:`send_drop`); the sizes it
        refused as larger than the first hop go to :attr:`refused`.
        """
        sent = 0
        n = len(datagrams)
        i = 0
        sock = self.sock
        gso = self.gso
        while i < n:
            first = datagrams[i]
            size = len(first)
            j = i + 1
            if gso:
                limit = min(n, i + MAX_SEGMENTS, i + MAX_GSO_BYTES // max(size, 1))
                while j < limit and len(datagrams[j]) == size:
                    j += 1
                if j - i > 1 and j < limit and len(datagrams[j]) < size:
                    # the last segment may be shorter; a lone datagram (a path MTU probe of a
                    # size of its own) goes alone, so its EMSGSIZE names it
                    j += 1
            if j - i > 1:
                run = datagrams[i:j]  # gathered by the kernel: no copy into one buffer
                cmsg = [(_SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
                try:
                    if to is None:
                        sent += sock.sendmsg(run, cmsg)
                    else:
                        sent += sock.sendmsg(run, cmsg, 0, to)
                except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                    self.send_drop += j - i  # a full buffer, an ICMP error: the run is lost
                except OSError:
                    sent += self._send_alone(run, to)
                    gso = self.gso
                i = j
                continue
            try:
                if to is None:
                    sock.send(first)
                else:
                    sock.sendto(first, to)
                sent += size
            except OSError as exc:
                self.send_drop += 1
                if exc.errno == errno.EMSGSIZE:
                    self.refused.append(size)
            i = j
        return sent

    def _send_alone(self, run: Sequence[bytes], to: Any) -> int:
        """A run the kernel refused as a whole, again one datagram per call; the bytes sent.

        If every datagram goes out, the kernel refused GSO itself (an old kernel, a device
        without checksum offload): GSO is off from now on. Otherwise each datagram met its own
        fate (``EMSGSIZE``: larger than the first hop, as path MTU discovery must learn; no
        route; a firewall) and GSO stays on for the runs that fit.
        """
        sock = self.sock
        drops = self.send_drop
        sent = 0
        for datagram in run:
            try:
                if to is None:
                    sock.send(datagram)
                else:
                    sock.sendto(datagram, to)
                sent += len(datagram)
            except OSError as exc:
                self.send_drop += 1
                if exc.errno == errno.EMSGSIZE:
                    self.refused.append(len(datagram))
        if self.send_drop == drops:
            self.gso = False
            self.gso_failures += 1
        return sent
