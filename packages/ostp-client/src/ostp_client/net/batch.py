"""Batched UDP I/O: GSO on send and GRO on receive where Linux offers them.

The system call per datagram, not the cipher, bounds a Python UDP tunnel (PERFORMANCE.md), so
runs of equal-size datagrams leave in one ``sendmsg`` with ``UDP_SEGMENT`` and coalesced
buffers are split again on receive. Elsewhere (or if the kernel refuses) a plain one-datagram
path is used; both are exercised by the tests.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104  # linux/udp.h
MAX_SEGMENTS = 64  # the kernel allows up to 128 (UDP_MAX_SEGMENTS); half keeps bursts short
MAX_GSO_BYTES = 65000  # one sendmsg carries at most 64 KiB of payload
RECV_BUFFER = 65535
_ANC_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_U16 = struct.Struct("=H")
_NATIVE_INT = struct.Struct("=i")


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
        for _ in range(limit):
            try:
                data, ancdata, _flags, _addr = recvmsg(RECV_BUFFER, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            out.extend(split_coalesced(data, ancdata))
        return out

    def recv_from_batch(self, limit: int = 256) -> list[tuple[bytes, Any]]:
        """Like :meth:`recv_batch` on an unconnected socket: ``(datagram, source)`` pairs."""
        out: list[tuple[bytes, Any]] = []
        sock = self.sock
        gro = self.gro
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
                if j < limit and len(datagrams[j]) < size:
                    j += 1  # the last segment may be shorter
            try:
                if j - i > 1:
                    payload = b"".join(datagrams[i:j])
                    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
                    if to is None:
                        sock.sendmsg([payload], cmsg)
                    else:
                        sock.sendmsg([payload], cmsg, 0, to)
                    sent += len(payload)
                else:
                    if to is None:
                        sock.send(first)
                    else:
                        sock.sendto(first, to)
                    sent += size
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                pass
            except OSError:
                if j - i > 1:
                    # GSO refused (an old kernel, a device without it): fall back for good
                    self.gso_failures += 1
                    self.gso = False
                    continue
            i = j
        return sent
