"""The server's `connect failed: <reason>` text → SOCKS5 reply and HTTP status (spec §9.5)."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.flow import Address
from ostp_client.inbounds.proxy.http import status_for_error
from ostp_client.inbounds.proxy.socks5 import encode_address, reply_for_error
from ostp_client.outbounds.connect_errors import error_from_reason
from ostp_server.session import connect_failure_reason
from tests.client.proxy_helpers import proxy_port, running_daemon
from tests.client.tunnel_helpers import ostp_server

REFUSED, NET, HOST, TTL, GENERAL, NOT_ALLOWED = 0x05, 0x03, 0x04, 0x06, 0x01, 0x02

# (reason after "connect failed: ", SOCKS5 reply, HTTP status)
CASES = [
    # upstream's Rust server: io::Error display, anyhow context, tokio timeouts
    ("Connection refused (os error 111)", REFUSED, 502),
    ("127.0.0.1:1: Connection refused (os error 111)", REFUSED, 502),
    ("connection refused", REFUSED, 502),
    ("Network is unreachable (os error 101)", NET, 502),
    ("[2001:db8::1]:443: Network is unreachable (os error 101)", NET, 502),
    ("No route to host (os error 113)", HOST, 502),
    ("Host is unreachable (os error 113)", HOST, 502),
    ("Connection timed out (os error 110)", TTL, 504),
    ("connect timeout (10s): example.com:443", TTL, 504),
    ("93.184.216.34:443: connect timeout (3s)", TTL, 504),
    ("deadline has elapsed", TTL, 504),
    (
        "dns resolution failed for nx.example:443: failed to lookup address information: "
        "Name or service not known",
        HOST,
        502,
    ),
    ("failed to lookup address information: Temporary failure in name resolution", HOST, 502),
    ("no addresses resolved for nx.example:443", HOST, 502),
    ("blocked by outbound rule: ads.example:443", NOT_ALLOWED, 403),
    ("encrypted DNS is blocked: this server filters DNS", NOT_ALLOWED, 403),
    (
        '10.0.0.5:5432: a private network address, closed to clients ("local_access": true '
        "in the server config opens it)",
        NOT_ALLOWED,
        403,
    ),
    ("SOCKS5 connect failed: 0x05", REFUSED, 502),
    ("SOCKS5 connect failed: 0x04", HOST, 502),
    ("SOCKS5 connect failed: 0x01", GENERAL, 502),
    ("too many open connections for this key", GENERAL, 502),
    ("HTTP CONNECT failed: HTTP/1.1 502 Bad Gateway", GENERAL, 502),
    # Python servers (this repository's, before and after it worded errors like upstream)
    ("[Errno 111] Connect call failed ('127.0.0.1', 1)", REFUSED, 502),
    ("[Errno 111] Connection refused", REFUSED, 502),
    ("[Errno 101] Network is unreachable", NET, 502),
    ("[Errno 113] No route to host", HOST, 502),
    ("[Errno -2] Name or service not known", HOST, 502),
    ("[Errno -3] Temporary failure in name resolution", HOST, 502),
    ("[Errno 8] nodename nor servname provided, or not known", HOST, 502),
    ("[Errno 61] Connection refused", REFUSED, 502),  # macOS
    (
        "[WinError 10061] No connection could be made because the target machine actively "
        "refused it",
        REFUSED,
        502,
    ),
    ("[Errno 11001] getaddrinfo failed", HOST, 502),
    ("timed out", TTL, 504),
    ("All connection attempts failed", GENERAL, 502),
    ("", GENERAL, 502),
    # a host name is never a reason: names have no spaces
    ("no.such.thing: refused.example:443 something", GENERAL, 502),
    ("timeout.example:80: Connection refused (os error 111)", REFUSED, 502),
    ("connection-refused.example:80 said nothing", GENERAL, 502),
]


@pytest.mark.parametrize(("reason", "reply", "status"), CASES)
def test_reason_to_socks5_reply_and_http_status(reason: str, reply: int, status: int) -> None:
    error = error_from_reason(f"connect failed: {reason}")
    assert reply_for_error(error) == reply
    assert status_for_error(error) == status
    assert str(error) == f"connect failed: {reason}"  # the text is kept for the log


@given(st.text(max_size=200))
def test_any_text_maps_to_some_error(text: str) -> None:
    assert reply_for_error(error_from_reason(text)) in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06)


def test_server_words_its_failures_like_upstream() -> None:
    refused = OSError(111, "Connect call failed ('127.0.0.1', 1)")
    wrapped = OSError("All connection attempts failed")
    wrapped.__cause__ = refused
    assert connect_failure_reason(wrapped) == "Connection refused (os error 111)"
    grouped = OSError("All connection attempts failed")
    grouped.__cause__ = ExceptionGroup("attempts", [OSError(101, "x"), OSError(111, "y")])
    assert connect_failure_reason(grouped) == "Network is unreachable (os error 101)"
    nx = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connect_failure_reason(nx) == (
        "failed to lookup address information: Name or service not known"
    )
    assert connect_failure_reason(ValueError("bad port")) == "bad port"
    for text in map(connect_failure_reason, (wrapped, grouped, nx)):
        assert reply_for_error(error_from_reason(text)) != GENERAL


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_a_closed_port_behind_the_tunnel_is_refused_not_a_general_failure(
    tmp_path: Path,
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with ostp_server(tmp_path) as server:
        config = {
            "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
            "outbounds": [server.outbound()],
        }
        async with running_daemon(config) as daemon:
            port = proxy_port(daemon)
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(
                    b"\x05\x01\x00\x05\x01\x00" + encode_address(Address("127.0.0.1", closed))
                )
                reply = b""
                with anyio.fail_after(30):
                    while len(reply) < 2 + 10:
                        reply += await stream.receive()
            assert reply[:2] == b"\x05\x00"
            assert reply[2:4] == bytes((0x05, REFUSED)), reply
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                where = f"127.0.0.1:{closed}"
                await stream.send(f"GET http://{where}/ HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
                with anyio.fail_after(30):
                    head = await stream.receive()
            assert head.startswith(b"HTTP/1.1 502 "), head
            assert b"Connection refused" in head
