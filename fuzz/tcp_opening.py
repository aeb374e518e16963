"""Fuzz entry point for the first bytes on the server's TCP port (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.tcp_opening import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``.

The bytes are cut into pieces (the first byte says where) and fed to a
:class:`~ostp_proto.transport.StreamAcceptor` with Reality on, as the server does; the
``/stream``/``/wss`` request parser and the ClientHello parser see them directly too. Garbage
may only produce a refusal (never a session), ``None`` (need more), or a
``RemoteProtocolError`` from a parser, and the acceptor never buffers more than its bound.
"""

from __future__ import annotations

import contextlib

from ostp_proto import RemoteProtocolError
from ostp_proto.transport import StreamAccepted, StreamAcceptor, StreamRefused
from ostp_proto.transport import reality as R
from ostp_proto.transport import xhttp as X
from ostp_proto.transport.stream import MAX_FIRST_FLIGHT

UNIX = 1_700_000_000.0
KEYS = [b"fuzz-key"]
_REALITY = R.RealityAcceptor(
    private_key=bytes(range(32)), short_ids=[bytes(8)], server_names=["www.example.com"]
)


def test_one_input(data: bytes) -> None:
    for parse in (X.parse_request, R.parse_client_hello):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)
    for framing in (X.Framing.STREAM, X.Framing.WSS):
        with contextlib.suppress(RemoteProtocolError):
            X.parse_response(data, framing)
    step = (data[0] % 61) + 1 if data else 1
    acceptor = StreamAcceptor(KEYS, _REALITY)
    verdict: StreamAccepted | StreamRefused | None = None
    for start in range(0, len(data), step):
        verdict = acceptor.receive(data[start : start + step], UNIX)
        acceptor.data_to_send()
        if verdict is not None:
            break
        assert acceptor.received <= MAX_FIRST_FLIGHT + step
    if verdict is None:
        verdict = acceptor.timed_out()
    # random bytes never carry a valid token or a hello sealed to our key
    assert isinstance(verdict, StreamRefused), verdict
    assert data.startswith(verdict.received)
