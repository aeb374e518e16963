"""Socket buffers and the kernel's drop counters (ostp_sockets.buffers, BatchSocket).

Without CAP_NET_ADMIN a buffer request is silently capped at ``net.core.rmem_max``; a receiver
that falls behind loses datagrams in the kernel, invisibly unless it asks (``SO_RXQ_OVFL`` with
every datagram, or the socket's ``drops`` in ``/proc/net/udp``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest

from ostp_sockets import BatchSocket, proc_udp_drops, set_buffers

pytestmark = pytest.mark.requires(sys.platform == "linux", "kernel drop counters are Linux's")

SMALL = 64 * 1024


def _pair(buffer: int) -> tuple[socket.socket, socket.socket]:
    """A receiver with a ``buffer``-byte receive buffer and a sender connected to it."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_buffers(receiver, buffer)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    receiver.connect(sender.getsockname())
    return receiver, sender


def _flood(sender: socket.socket, count: int = 2000) -> None:
    payload = os.urandom(1200)
    for _ in range(count):
        with contextlib.suppress(BlockingIOError):
            sender.send(payload)


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "plain"])
def test_batch_socket_counts_the_kernels_drops(gro: bool) -> None:
    receiver, sender = _pair(SMALL)
    with receiver, sender:
        batch = BatchSocket(receiver, gro=gro)
        assert batch.kernel_drops() == 0
        _flood(sender)
        got = list(batch.recv_batch(4096))
        assert 0 < len(got) < 2000  # the buffer held only some of them
        dropped = proc_udp_drops(receiver)
        assert dropped is not None and dropped == 2000 - len(got)
        assert batch.kernel_drops() == dropped
        # the counter also comes with every datagram queued after a drop (SO_RXQ_OVFL)
        sender.send(b"one more")
        assert list(batch.recv_batch()) == [b"one more"]
        assert batch.drops_reported == (dropped if gro else 0)


def test_set_buffers_reports_what_the_kernel_granted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        granted = set_buffers(sock, SMALL)
        assert (granted.requested, granted.receive) == (SMALL, SMALL)
        assert not granted.capped
