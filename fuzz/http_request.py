"""Fuzz entry point for the HTTP proxy's hand-written glue around h11 (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.http_request import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``. Bytes go through
h11's server side; every request head it accepts is fed to the target and header glue. Only
``h11.RemoteProtocolError`` and ``HttpProxyError`` may come out; `transfer_coding_status` of
any bytes is 400 or 501.
"""

from __future__ import annotations

import h11

from ostp_client.inbounds.proxy.http import (
    HOP_BY_HOP,
    HttpProxyError,
    forward_headers,
    parse_absolute_uri,
    parse_authority,
    parse_proxy_authorization,
    transfer_coding_status,
)


def _glue(target: str, headers: list[tuple[bytes, bytes]]) -> None:
    for default_port in (443, None):
        try:
            if default_port is None:
                address = parse_absolute_uri(target)[0]
            else:
                address = parse_authority(target, default_port)
        except HttpProxyError:
            continue
        assert address.host and 0 < address.port < 65536
    kept = forward_headers(headers)
    assert not any(name in HOP_BY_HOP or name.startswith(b"proxy-") for name, _ in kept)
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        assert all(name != b"content-length" for name, _ in kept)  # RFC 9112 §6.1
    parse_proxy_authorization(headers)


def test_one_input(data: bytes) -> None:
    _glue(data.decode("latin-1"), [(b"proxy-authorization", data), (b"connection", data)])
    assert transfer_coding_status(data) in (400, 501)
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                _glue(event.target.decode("latin-1"), list(event.headers))
            if event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
                return
    except h11.RemoteProtocolError:
        return
