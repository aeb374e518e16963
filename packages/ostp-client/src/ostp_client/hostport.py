"""`host:port` text: one parser and one formatter for every address the client reads or prints.

Sans-IO (stdlib only). IPv6 literals are written in brackets (`[::1]:53`).
"""

from __future__ import annotations

import ipaddress

__all__ = ["format_host_port", "parse_host_port"]


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port`, `[v6]:port` or (with `default_port`) a bare host; raise ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if not rest:
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"unexpected {rest!r} after ']'")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port") from None
        host, port_text = text, None
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def format_host_port(host: object, port: int) -> str:
    """`host:port`, with an IPv6 literal in brackets (`[::1]:53`)."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
