"""Exceptions of the NAT traversal package, split as h11 does (STYLE.md)."""

from ostp_client.errors import OstpClientError


class NatError(OstpClientError):
    """Base class of every error this package raises."""


class LocalNatError(NatError):
    """The caller used the API wrongly (sending before the relay is ready, a bad argument)."""


class StunParseError(NatError):
    """Bytes from the network are not a well-formed STUN message or ChannelData frame.

    Raised only by the codecs; the clients and the demultiplexer catch it, drop the datagram
    and count it.
    """
