"""Socket buffers: ask for large ones, say what the kernel granted, read its drop counter."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass

__all__ = ["SocketBuffers", "proc_udp_drops", "set_buffers"]

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # CAP_NET_ADMIN may pass rmem_max
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


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
    unpaced sender then overruns the socket. A system that refuses the size outright (BSDs
    above ``kern.ipc.maxsockbuf``) keeps its default, which the result then shows.
    """
    forced = True
    for opt, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            forced = False
            with contextlib.suppress(OSError):
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
