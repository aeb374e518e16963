"""`host:port` text: the one parser and the one formatter the client and the server share.

Relay messages carry addresses as this text (Connect, UdpData: spec §8), written the way Rust
prints socket addresses: ``1.2.3.4:443``, ``example.com:443``, ``[2001:db8::1]:443``. The
configuration files of both programs use the same form. Sans-IO (stdlib only).
"""

from __future__ import annotations

import ipaddress

__all__ = ["format_host_port", "format_sockaddr", "parse_host_port", "sockaddr_host"]


def parse_host_port(
    text: str, default_port: int | None = None, *, allow_port_zero: bool = False
) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into ``(host, port)``; raise ValueError saying why.

    ``default_port``: a bare host (``example.com``, ``[::1]``, ``::1``) gets this port instead
    of being refused. ``allow_port_zero``: port 0 is accepted (a listen address on which the
    system picks the port; a relay address, whose connect then fails as upstream's does);
    otherwise ports run from 1 to 65535. Surrounding whitespace is ignored; an IPv6 host is
    returned without its brackets.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address (expected host:port)")
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
        if not rest:
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # two or more: only a bare IPv6 address, which takes the default port
        if default_port is None or not _is_ipv6(text):
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
        host, port_text = text, None
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        return host, default_port
    lowest = 0 if allow_port_zero else 1
    # isascii: str.isdigit() is also true for other scripts' digits, which int() would take
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or not (
        lowest <= int(port_text) <= 65535
    ):
        raise ValueError(f"port {port_text!r} is not a number from {lowest} to 65535")
    return host, int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_host_port(host: object, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:53``), as spec §8 writes it.

    A host containing ``:`` can only be an IPv6 literal (possibly with a ``%scope``), so no
    address parsing is needed to decide.
    """
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def sockaddr_host(host: object) -> str:
    """A socket address's host as text: an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, what a
    dual-stack socket reports for an IPv4 peer) as IPv4, an IPv6 ``%scope`` left out."""
    text = str(host).split("%", 1)[0]
    if text.startswith("::ffff:") and "." in text:
        return text[7:]
    return text


def format_sockaddr(address: tuple[object, ...]) -> str:
    """A socket address (``(host, port)``, or the 4-tuple of IPv6) as ``host:port`` text, its
    host as `sockaddr_host` writes it: how peers appear in logs, and the source of a UDP
    datagram in a UdpData message (spec §8)."""
    return format_host_port(sockaddr_host(address[0]), int(str(address[1])))
