"""Session health after transport ``auto`` moves a session from UDP to TCP.

Over UDP, ``auto``'s own check moves a silent session to TCP and health stays out of its way.
Once on TCP, health applies again, but it must give the new path its own keepalive intervals:
the last Pong was answered on the old, silent path, so judged by that sample the session was
replaced in the same round as the move, resetting every stream the move had just carried over
(test_transport_auto failed this way: curl saw a reset).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence

import pytest

from ostp_client.outbounds.ostp import OstpOutbound, _Session
from ostp_client.transport.udp import UdpTransport, open_udp_socket
from ostp_sockets import BatchSocket
from tests.proto.harness import KEY, Pair


class _TcpLike:
    """A reliable transport the session can switch to (no TCP server is needed for the check)."""

    kind = "tcp"
    reliable = True
    failure: str | None = None
    blocked = False

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sent = 0

    def recv_batch(self, limit: int = 256) -> list[bytes]:
        return []

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        self.sent += len(datagrams)
        return sum(len(d) for d in datagrams)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session() -> Iterator[_Session]:
    outbound = OstpOutbound(
        "proxy", server=("127.0.0.1", 9), access_key=KEY, transport="auto", keepalive_interval=1.0
    )
    session = outbound.sessions[0]
    pair = Pair()
    pair.handshake()
    session.conn = pair.client  # established; its last Pong was sampled on the virtual clock,
    # long before time.monotonic(): a path that went silent long ago
    sock, buffers = open_udp_socket(socket.AF_INET, 64 * 1024)
    sock.connect(("127.0.0.1", 9))
    session.transport = UdpTransport(BatchSocket(sock, gso=False, gro=False), buffers)
    yield session
    if session.transport is not None:
        session.transport.close()


def test_health_waits_for_the_new_path_after_auto_moves_to_tcp(session: _Session) -> None:
    conn = session.conn
    assert conn is not None and conn.established
    assert session._health_deadline(conn) is None  # auto over UDP: auto's own check decides
    tcp = _TcpLike()
    session._switch(conn, tcp, "UDP stopped passing")
    deadline = session._health_deadline(conn)
    assert deadline is not None  # over TCP health applies
    now = time.monotonic()
    # the new path gets its keepalive intervals before its silence counts
    assert deadline > now + 2 * session.outbound.keepalive_interval
