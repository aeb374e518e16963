"""Batched UDP I/O: GSO on send and GRO on receive where Linux offers them.

The system call per datagram, not the cipher, bounds a Python UDP tunnel (PERFORMANCE.md), so
runs of equal-size datagrams leave in one ``sendmsg`` with ``UDP_SEGMENT`` and coalesced
buffers are split again on receive. Elsewhere (or if the kernel refuses) a plain one-datagram
path is used; both are exercised by the tests.

Datagrams leave with DF set and never fragmented (:func:`set_dont_fragment`): path MTU discovery
(RFC 8899, :mod:`ostp_proto.pmtud`) sizes them, and a datagram too large for the first hop is
refused with ``EMSGSIZE``, which :class:`BatchSocket` reports in :attr:`BatchSocket.refused`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104  # linux/udp.h
SO_RXQ_OVFL = 40  # asm-generic/socket.h: the socket's drop count comes with each datagram
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # CAP_NET_ADMIN may pass rmem_max
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
MAX_SEGMENTS = 64  # the kernel allows up to 128 (UDP_MAX_SEGMENTS); half keeps bursts short
MAX_GSO_BYTES = 65000  # one sendmsg carries at most 64 KiB of payload
RECV_BUFFER = 65535
# room for two items: the GRO segment size and the drop counter
_ANC_SPACE = 2 * socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_U16 = struct.Struct("=H")
_NATIVE_INT = struct.Struct("=i")
# linux/in.h, linux/in6.h
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
PMTUDISC_PROBE = 3  # IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: DF set, the kernel's PMTU ignored
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
IPV4_UDP_OVERHEAD = 28
IPV6_UDP_OVERHEAD = 48


def set_dont_fragment(sock: socket.socket) -> bool:
    """Send every datagram with DF set and without the kernel's path MTU cache (Linux).

    ``IP_PMTUDISC_PROBE``: a datagram larger than the route's MTU is never fragmented; above the
    interface's MTU it is refused with ``EMSGSIZE``; an ICMP "too big" does not shrink later
    sends behind our back (path MTU discovery decides sizes). False where not supported.
    """
    if sys.platform != "linux":
        return False
    ok = False
    levels = [(socket.IPPROTO_IP, IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        levels.insert(0, (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))  # v4-mapped use the other
    for level, option in levels:
        try:
            sock.setsockopt(level, option, PMTUDISC_PROBE)
            ok = True
        except OSError:
            pass
    return ok


def udp_overhead(family: int) -> int:
    """IP and UDP header bytes in front of a datagram's payload."""
    return IPV6_UDP_OVERHEAD if family == socket.AF_INET6 else IPV4_UDP_OVERHEAD


def first_hop_payload(family: int, address: Any) -> int | None:
    """The largest UDP payload the route towards ``address`` carries without fragmenting
    (its first hop's MTU minus headers), or None where the system does not say (Linux only).

    Asked of a throw-away connected socket, so it works for unconnected sockets too."""
    if sys.platform != "linux":
        return None
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            if family == socket.AF_INET6:
                mtu = probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            else:
                mtu = probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return None
    return int(mtu) - udp_overhead(family) if mtu > 0 else None


_U32 = struct.Struct("=I")


def split_coalesced(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one GRO read: cut every ``gso_size`` bytes when the kernel says so."""
    segment = 0
    for level, kind, value in ancdata:
        if level == socket.SOL_UDP and kind == UDP_GRO:
            segment = _NATIVE_INT.unpack(value[:4])[0]
    if segment and len(data) > segment:
        view = memoryview(data)
        return [bytes(view[i : i + segment]) for i in range(0, len(data), segment)]
    return [data]


class BatchSocket:
    """A connected or unconnected UDP socket with optional GSO/GRO."""

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self.sock = sock
        self.gso = gso and sys.platform == "linux"
        self.gro = False
        if gro and sys.platform == "linux":
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                self.gro = False
        self.gso_failures = 0
        self.refused: list[int] = []
        """Sizes of datagrams the kernel refused as larger than the first hop (``EMSGSIZE``);
        the owner reports them to its connection and clears the list."""
        self.drops_reported = 0
        """The kernel's count of datagrams it dropped for this socket (a full receive buffer),
        as last reported with a datagram (``SO_RXQ_OVFL``); see :meth:`kernel_drops`."""
        self._rxq_ovfl = False
        if self.gro:  # only the recvmsg path sees ancillary data
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

    def _note_drops(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, value in ancdata:
            if kind == SO_RXQ_OVFL and level == socket.SOL_SOCKET:
                self.drops_reported = _U32.unpack(value[:4])[0]

    # -- receive -------------------------------------------------------------------------------

    def recv_batch(self, limit: int = 256) -> list[bytes]:
        """Every datagram waiting (up to ``limit`` system calls); [] when none."""
        out: list[bytes] = []
        sock = self.sock
        if not self.gro:
            recv = sock.recv
            for _ in range(limit):
                try:
                    out.append(recv(RECV_BUFFER))
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    continue
            return out
        recvmsg = sock.recvmsg
        ancdata: list[tuple[int, int, bytes]] = []
        for _ in range(limit):
            try:
                data, ancdata, _flags, _addr = recvmsg(RECV_BUFFER, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            out.extend(split_coalesced(data, ancdata))
        if ancdata:
            self._note_drops(ancdata)  # once per batch: the last datagram's count is newest
        return out

    def recv_from_batch(self, limit: int = 256) -> list[tuple[bytes, Any]]:
        """Like :meth:`recv_batch` on an unconnected socket: ``(datagram, source)`` pairs."""
        out: list[tuple[bytes, Any]] = []
        sock = self.sock
        gro = self.gro
        ancdata: list[tuple[int, int, bytes]] = []
        for _ in range(limit):
            try:
                if gro:
                    data, ancdata, _flags, addr = sock.recvmsg(RECV_BUFFER, _ANC_SPACE)
                else:
                    data, addr = sock.recvfrom(RECV_BUFFER)
                    ancdata = []
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            out.extend((part, addr) for part in split_coalesced(data, ancdata))
        if ancdata:
            self._note_drops(ancdata)
        return out

    # -- send ----------------------------------------------------------------------------------

    def send_batch(self, datagrams: Sequence[bytes], to: Any = None) -> int:
        """Send ``datagrams`` in order (to ``to``, or on a connected socket); the bytes sent.

        Kernel-side drops (a full buffer, ICMP errors) are treated as loss, as on the wire.
        """
        sent = 0
        n = len(datagrams)
        i = 0
        sock = self.sock
        while i < n:
            first = datagrams[i]
            size = len(first)
            j = i + 1
            if self.gso:
                limit = min(n, i + MAX_SEGMENTS, i + MAX_GSO_BYTES // max(size, 1))
                while j < limit and len(datagrams[j]) == size:
                    j += 1
                if j - i > 1 and j < limit and len(datagrams[j]) < size:
                    # the last segment may be shorter; a lone datagram (a path MTU probe of a
                    # size of its own) goes alone, so its EMSGSIZE names it
                    j += 1
            try:
                if j - i > 1:
                    parts = datagrams[i:j]  # gathered by the kernel: no copy into one buffer
                    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
                    if to is None:
                        sent += sock.sendmsg(parts, cmsg)
                    else:
                        sent += sock.sendmsg(parts, cmsg, 0, to)
                else:
                    if to is None:
                        sock.send(first)
                    else:
                        sock.sendto(first, to)
                    sent += size
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                pass
            except OSError as exc:
                if j - i == 1 and exc.errno == errno.EMSGSIZE:
                    self.refused.append(size)
                elif j - i > 1:
                    # GSO refused (an old kernel, a device without it): fall back for good
                    self.gso_failures += 1
                    self.gso = False
                    continue
            i = j
        return sent


# -- socket buffers and kernel drops ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketBuffers:
    """What the kernel granted for one socket's buffers (bytes of payload room)."""

    requested: int
    receive: int
    send: int
    forced: bool
    """True if ``SO_RCVBUFFORCE`` was allowed (CAP_NET_ADMIN): the request was not capped."""

    @property
    def capped(self) -> bool:
        return self.receive < self.requested


def set_buffers(sock: socket.socket, size: int) -> SocketBuffers:
    """Ask for ``size`` bytes of receive and send buffer; what was granted.

    With CAP_NET_ADMIN the ``*FORCE`` options pass ``net.core.rmem_max``/``wmem_max``;
    otherwise the kernel silently caps the request at them (4 MiB on many systems), and an
    unpaced sender then overruns the socket.
    """
    forced = True
    for opt, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            forced = False
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
    receive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    send = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if sys.platform == "linux":  # socket(7): the kernel doubles the value for its bookkeeping
        receive //= 2
        send //= 2
    return SocketBuffers(size, receive, send, forced)


def proc_udp_drops(sock: socket.socket) -> int | None:
    """The ``drops`` column of ``sock``'s line in ``/proc/net/udp{,6}`` (Linux), or None."""
    if sys.platform != "linux":
        return None
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
        name = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
        with open(name, encoding="ascii") as table:
            next(table, None)  # the header
            for line in table:
                fields = line.split()
                # sl local rem st queues tr retrnsmt uid timeout inode ref pointer drops
                if len(fields) >= 13 and fields[9] == inode:
                    return int(fields[12])
    except (OSError, ValueError):
        return None
    return None
