"""Fuzz entry point for what the server reads from the network (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.server_datagram import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``.

Two edges: a UDP datagram from anyone (dispatch: session lookup, roaming scan, handshake trial)
must be dropped silently and counted; the address text of Connect/UdpData (spec §8) parses or
raises ``ValueError``, nothing else.
"""

from __future__ import annotations

import socket

from ostp_proto import format_sockaddr
from ostp_proto.address import format_host_port, parse_host_port
from ostp_server.config import ServerConfig
from ostp_server.server import Listener, OstpServer
from ostp_server.session import Session

_SERVER = OstpServer(
    ServerConfig.model_validate({"listen": "127.0.0.1:0", "access_keys": ["fuzz-key", "k2"]}),
    clock=lambda: 1000.0,
    unix_clock=lambda: 1_700_000_000.0,
)
_LISTENER = Listener(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", 0))


def test_one_input(data: bytes) -> None:
    before = _SERVER.stats.unauthenticated_drop
    touched: dict[Session, None] = {}
    _SERVER._dispatch(data, ("127.0.0.1", 40000), _LISTENER, 1000.0, 1_700_000_000.0, touched)
    assert _SERVER.stats.unauthenticated_drop == before + 1
    assert not touched and not _SERVER.sessions

    text = data.decode("utf-8", "replace")
    try:
        host, port = parse_host_port(text, allow_port_zero=True)  # as the server reads it
    except ValueError:
        return
    assert 0 <= port <= 65535 and host
    assert format_host_port(host, port).endswith(f":{port}")
    assert format_sockaddr((host, port)).endswith(f":{port}")
