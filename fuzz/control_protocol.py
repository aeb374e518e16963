"""Fuzz entry point: the control protocol's parsers (requests on the daemon side, server
messages on the client side). Garbage may only be refused with ValidationError/ProtocolError.

Run with atheris: ``python -c "import atheris, sys; from fuzz.control_protocol import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``.
"""

from __future__ import annotations

import contextlib

from pydantic import ValidationError

from ostp_client.control.protocol import ProtocolError, Request, parse_server_message


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(ValidationError):
        Request.model_validate_json(data)
    with contextlib.suppress(ProtocolError):
        parse_server_message(data)
