"""The OSTP server's `Error("connect failed: <reason>")` text (spec §9.5) as an OutboundError.

The reason is free text, whatever the server's OS and language said. Upstream (Rust) sends
`io::Error`'s Display ("Connection refused (os error 111)"), often behind anyhow context
("127.0.0.1:1: ...", "dns resolution failed for x:443: failed to lookup address information:
Name or service not known", "connect timeout (10s): x:443"); the reference server in this
repository sends the same words. Python's socket errors read "[Errno 111] Connection refused"
or just "[Errno 111] Connect call failed ('127.0.0.1', 1)"; Windows adds "[WinError 10061]".

Only phrases that contain a space, and errno numbers, are matched: a host name has no spaces,
so the target named in the text cannot pass for a reason ("refused.example" is no refusal).
The inbounds turn the result into the SOCKS5 reply (RFC 1928 §6) and the HTTP status.
"""

from __future__ import annotations

import re

from ostp_client.flow import (
    Blocked,
    ConnectionRefused,
    ConnectTimeout,
    GeneralFailure,
    HostUnreachable,
    NetworkUnreachable,
    OutboundError,
)

__all__ = ["error_from_reason"]

ErrorKind = type[OutboundError]

# First match wins: policy and name resolution first, because their texts go on to quote the
# underlying error ("dns resolution failed for x: ... timed out" is a name that did not
# resolve, not a connect timeout).
_PHRASES: tuple[tuple[tuple[str, ...], ErrorKind], ...] = (
    (
        (
            "blocked by",  # upstream: "blocked by outbound rule: x"
            "is blocked",  # upstream: "encrypted DNS is blocked: ..."
            "closed to clients",  # upstream's target policy (private/loopback addresses)
            "not allowed",
        ),
        Blocked,
    ),
    (
        (
            "failed to lookup address",  # Rust
            "dns resolution failed",  # upstream's context
            "no addresses resolved",  # upstream
            "name or service not known",  # glibc EAI_NONAME
            "name resolution",  # "Temporary failure in name resolution" (EAI_AGAIN)
            "no address associated",  # EAI_NODATA
            "nodename nor servname",  # BSD/macOS EAI_NONAME
            "getaddrinfo failed",  # Windows Python
            "no such host",  # Windows: "No such host is known"
            "cannot resolve",
        ),
        HostUnreachable,
    ),
    (("connection refused", "actively refused"), ConnectionRefused),
    (
        ("timed out", "connect timeout", "deadline has elapsed", "operation timeout"),
        ConnectTimeout,
    ),
    (("network is unreachable", "network unreachable", "network is down"), NetworkUnreachable),
    (
        ("no route to host", "host is unreachable", "host unreachable", "host is down"),
        HostUnreachable,
    ),
)

# errno values of the servers' systems: Linux, then BSD/macOS, then Windows (WSA*)
_ERRNOS: dict[int, ErrorKind] = {
    **dict.fromkeys((111, 61, 10061), ConnectionRefused),  # ECONNREFUSED
    **dict.fromkeys((110, 60, 10060), ConnectTimeout),  # ETIMEDOUT
    **dict.fromkeys((101, 51, 10051), NetworkUnreachable),  # ENETUNREACH
    **dict.fromkeys((100, 50, 10050), NetworkUnreachable),  # ENETDOWN
    **dict.fromkeys((113, 65, 10065), HostUnreachable),  # EHOSTUNREACH
    **dict.fromkeys((112, 64, 10064), HostUnreachable),  # EHOSTDOWN
}
_ERRNO = re.compile(r"(?:os error|errno|winerror) (-?\d+)")

# An upstream server that chains through a SOCKS5 proxy passes its reply code on.
_SOCKS5_REPLY = re.compile(r"socks5 connect failed: 0x([0-9a-f]{2})")
_SOCKS5_CODES: dict[int, ErrorKind] = {
    0x02: Blocked,
    0x03: NetworkUnreachable,
    0x04: HostUnreachable,
    0x05: ConnectionRefused,
    0x06: ConnectTimeout,
}


def error_from_reason(text: str) -> OutboundError:
    """The OutboundError for the server's `connect failed: <reason>` (the whole text kept)."""
    lowered = text.lower()
    for phrases, kind in _PHRASES:
        if any(phrase in lowered for phrase in phrases):
            return kind(text)
    for match in _ERRNO.finditer(lowered):
        errno_kind = _ERRNOS.get(int(match[1]))
        if errno_kind is not None:
            return errno_kind(text)
    reply = _SOCKS5_REPLY.search(lowered)
    if reply is not None:
        return _SOCKS5_CODES.get(int(reply[1], 16), GeneralFailure)(text)
    return GeneralFailure(text)
