"""Fuzz entry point for what an accepted TCP connection carries (atheris-compatible).

Run with atheris: ``python -c "import atheris, sys; from fuzz.stream_frames import
test_one_input; atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()"``.

``len:u16`` frames, WebSocket frames (both roles), Reality data records and a Reality client's
view of the server flight, each fed in pieces: only datagrams/plaintext or a
``RemoteProtocolError`` may come out, and nothing is buffered beyond one frame or record.
"""

from __future__ import annotations

from ostp_proto import RemoteProtocolError
from ostp_proto.transport import DatagramStream, Framing, LenU16Decoder, WsDecoder
from ostp_proto.transport import reality as R
from ostp_proto.transport.framing import WS_MAX_PAYLOAD

_KEY = bytes(range(32))


def _pieces(data: bytes) -> list[bytes]:
    step = (data[0] % 97) + 1 if data else 1
    return [data[i : i + step] for i in range(0, len(data), step)]


def test_one_input(data: bytes) -> None:
    pieces = _pieces(data)
    len16 = LenU16Decoder()
    for p in pieces:
        for d in len16.feed(p):
            assert len(d) <= 0xFFFF
        assert len16.buffered <= 2 + 0xFFFF
    ws = WsDecoder()
    try:
        for p in pieces:
            for d in ws.feed(p):
                assert len(d) <= WS_MAX_PAYLOAD
            while ws.next_control() is not None:
                pass
            assert ws.buffered <= 2 * (WS_MAX_PAYLOAD + 14)
    except RemoteProtocolError:
        pass
    for framing in (Framing.STREAM, Framing.WSS):
        for client in (False, True):
            stream = DatagramStream(framing, client=client)
            try:
                for p in pieces:
                    stream.receive(p)
                    stream.data_to_send()
            except RemoteProtocolError:
                pass
    for skip_ccs in (False, True):
        opener = R.RecordOpener(_KEY, skip_ccs=skip_ccs)
        try:
            for p in pieces:
                assert not opener.feed(p)  # nothing random authenticates
                assert opener.buffered <= R.RECORD_HEADER + R.MAX_RECORD_BODY
        except RemoteProtocolError:
            pass
    reality = R.RealityClient(server_public=R.public_key(_KEY), short_id=bytes(8))
    reality.hello(1_700_000_000)
    try:
        for p in pieces:
            reality.receive(p)
    except RemoteProtocolError:
        pass
