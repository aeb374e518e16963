"""A TCP connection whose socket is marked (`bypass.apply_bypass`) and bound before ``connect()``.

`anyio.connect_tcp` creates and connects its socket in one step, so an option that must be set
before the SYN leaves (``SO_MARK``: the SYN is already routed) cannot be applied through it.
Used by happy eyeballs (the `direct` outbound) and by the stub resolver's TCP fallback.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import anyio.abc

from ostp_client.net.bypass import apply_bypass

__all__ = ["connect_marked"]


async def connect_marked(
    family: int, sockaddr: tuple[Any, ...], local_host: str | None, mark: int | None
) -> anyio.abc.SocketStream:
    """Connect to ``sockaddr`` with a socket given the bypass (``mark``) before it connects."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        apply_bypass(sock, mark)  # before connect(): the SYN is routed by the mark
        if local_host is not None:
            sock.bind((local_host, 0))
        try:
            sock.connect(sockaddr)
            pending = False
        except BlockingIOError:
            pending = True
        if pending:
            await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"{os.strerror(error)}: {sockaddr[0]}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await anyio.abc.SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise
