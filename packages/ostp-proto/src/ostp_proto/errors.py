"""Exceptions of the protocol package, split as h11 does (STYLE.md)."""


class ProtocolError(Exception):
    """Base class of every error this package raises."""


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly (sending before the handshake, a bad argument, ...)."""


class RemoteProtocolError(ProtocolError):
    """Bytes from the peer do not follow the protocol.

    Raised only by the codecs; a connection catches it, drops the datagram and counts it.
    """
