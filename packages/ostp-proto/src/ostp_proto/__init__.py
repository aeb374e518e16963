"""ostp_proto: the OSTP wire protocol as a sans-IO library.

Byte-compatible with the upstream Rust implementation; the wire format is described in the
repository's docs/protocol.md (``spec §N`` in comments means its §N). Feed bytes and the current
time in; take datagrams and events out.
"""

from .acceptor import AcceptorStats, ServerAcceptor
from .address import format_host_port, format_sockaddr, parse_host_port, sockaddr_host
from .connection import (
    SERVER_DEFAULTS,
    ClientConnection,
    Connection,
    ConnectionConfig,
    ConnectionStats,
    ServerConnection,
    State,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    ConnectionTerminated,
    DataLost,
    Event,
    ExtensionsNegotiated,
    HandshakeCompleted,
    RelayMessageReceived,
    Termination,
)
from .frames import FrameKind, PaddingPolicy, Profile
from .keys import Secrets, derive_secrets, split_transport_keys
from .pmtud import PathMtuDiscovery, PmtudConfig, PmtudState
from .relay import (
    EXT_FLOW_CONTROL,
    EXT_PATH_PROBES,
    MIN_STREAM_WINDOW,
    Abandoned,
    Close,
    Connect,
    ConnectOk,
    Data,
    Error,
    ExtensionHello,
    KeepAlive,
    Ping,
    Pong,
    RelayMessage,
    UdpAssociate,
    UdpData,
    WindowUpdate,
    decode_relay,
    encode_extension_hello,
    encode_relay,
    parse_extension_hello,
)

__all__ = [
    "EXT_FLOW_CONTROL",
    "EXT_PATH_PROBES",
    "MIN_STREAM_WINDOW",
    "SERVER_DEFAULTS",
    "Abandoned",
    "AcceptorStats",
    "ClientConnection",
    "Close",
    "Connect",
    "ConnectOk",
    "Connection",
    "ConnectionConfig",
    "ConnectionStats",
    "ConnectionTerminated",
    "Data",
    "DataLost",
    "Error",
    "Event",
    "ExtensionHello",
    "ExtensionsNegotiated",
    "FrameKind",
    "HandshakeCompleted",
    "KeepAlive",
    "LocalProtocolError",
    "PaddingPolicy",
    "PathMtuDiscovery",
    "Ping",
    "PmtudConfig",
    "PmtudState",
    "Pong",
    "Profile",
    "ProtocolError",
    "RelayMessage",
    "RelayMessageReceived",
    "RemoteProtocolError",
    "Secrets",
    "ServerAcceptor",
    "ServerConnection",
    "State",
    "Termination",
    "UdpAssociate",
    "UdpData",
    "WindowUpdate",
    "decode_relay",
    "derive_secrets",
    "encode_extension_hello",
    "encode_relay",
    "format_host_port",
    "format_sockaddr",
    "parse_extension_hello",
    "parse_host_port",
    "sockaddr_host",
    "split_transport_keys",
]

__version__ = "0.2.0.dev0"
"""The package version (read by the build: `[tool.hatch.version]`)."""
