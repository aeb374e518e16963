"""OSTP over TCP: xHTTP ``/stream`` and ``/wss``, WebSocket framing and Reality (spec §10.6).

Sans-IO codecs for both roles; the server's TCP listener and the client's transports drive them.
"""

from .framing import (
    MAX_STREAM_DATAGRAM,
    LenU16Decoder,
    WsControlReceived,
    WsDecoder,
    encode_len_u16,
    encode_len_u16_many,
    encode_ws_frame,
    ws_mask,
)
from .reality import (
    RealityAcceptor,
    RealityClient,
    RealityKeys,
    RealityReplayCache,
    RealityServerSession,
    decode_key,
    derive_keys,
    encode_key,
    generate_keypair,
    public_key,
)
from .stream import (
    DatagramStream,
    StreamAccepted,
    StreamAcceptor,
    StreamConnected,
    StreamConnector,
    StreamRefused,
)
from .xhttp import NOT_FOUND, Framing, make_token, verify_token

__all__ = [
    "MAX_STREAM_DATAGRAM",
    "NOT_FOUND",
    "DatagramStream",
    "Framing",
    "LenU16Decoder",
    "RealityAcceptor",
    "RealityClient",
    "RealityKeys",
    "RealityReplayCache",
    "RealityServerSession",
    "StreamAccepted",
    "StreamAcceptor",
    "StreamConnected",
    "StreamConnector",
    "StreamRefused",
    "WsControlReceived",
    "WsDecoder",
    "decode_key",
    "derive_keys",
    "encode_key",
    "encode_len_u16",
    "encode_len_u16_many",
    "encode_ws_frame",
    "generate_keypair",
    "make_token",
    "public_key",
    "verify_token",
    "ws_mask",
]
