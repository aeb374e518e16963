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

UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104  # linux/udp.h
MAX_SEGMENTS = 64  # the kernel allows up to 128 (UDP_MAX_SEGMENTS); half keeps bursts short
MAX_GSO_BYTES = 65000  # one sendmsg carries at most 64 KiB of payload
RECV_BUFFER = 65535
_ANC_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_U16 = struct.Struct("=H")
_NATIVE_INT = struct.Struct("=i")


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
            segment = 0
            for level, kind, value in ancdata:
                if level == socket.SOL_UDP and kind == UDP_GRO:
                    segment = _NATIVE_INT.unpack(value[:4])[0]
            if segment and len(data) > segment:
                view = memoryview(data)
                out.extend(bytes(view[i : i + segment]) for i in range(0, len(data), segment))
            else:
                out.append(data)
        return out

    # -- send ----------------------------------------------------------------------------------

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        """Send ``datagrams`` in order on a connected socket; returns the bytes sent.

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
                    sock.sendmsg([payload], [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(size))])
                    sent += len(payload)
                else:
                    sock.send(first)
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
