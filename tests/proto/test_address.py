"""`host:port` text (ostp_proto.address): the one parser and formatter of the client and the
server, for configuration files and the relay messages' addresses (spec §8)."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_proto import format_host_port, format_sockaddr, parse_host_port, sockaddr_host

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.tuples(st.ip_addresses(v=6), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)).map(
        lambda pair: f"{pair[0]}%{pair[1]}"  # a scoped link-local address as sockets give it
    ),
    names,
)
ports = st.integers(min_value=1, max_value=65535)
# text made of the characters the parser cares about, so that near misses are common (and a
# digit of another script, which str.isdigit() accepts)
near_misses = st.text(alphabet="[]:%.0123456789abcdef \t\u0661", max_size=40)


@given(hosts, ports)
def test_format_then_parse_gives_the_address_back(host: str, port: int) -> None:
    text = format_host_port(host, port)
    assert parse_host_port(text) == (host, port)
    assert parse_host_port(f"  {text}\n") == (host, port)
    if ":" in host:
        assert text.startswith("[")
        assert ipaddress.ip_address(host.split("%", maxsplit=1)[0]).version == 6
    else:
        assert text == f"{host}:{port}"


@given(hosts)
def test_port_zero_only_where_allowed(host: str) -> None:
    text = format_host_port(host, 0)
    assert parse_host_port(text, allow_port_zero=True) == (host, 0)
    with pytest.raises(ValueError, match="from 1 to 65535"):
        parse_host_port(text)


@given(hosts, ports)
def test_a_bare_host_takes_the_default_port(host: str, port: int) -> None:
    bracketed = f"[{host}]" if ":" in host else host
    assert parse_host_port(bracketed, port) == (host, port)
    if ":" in host:
        assert parse_host_port(host, port) == (host, port)  # a bare IPv6 address
    with pytest.raises(ValueError, match=r"missing port|write IPv6"):
        parse_host_port(host)


@given(st.one_of(st.text(max_size=60), near_misses), st.booleans(), st.none() | ports)
def test_garbage_raises_value_error_or_parses_to_a_sound_address(
    text: str, zero: bool, default: int | None
) -> None:
    try:
        host, port = parse_host_port(text, default, allow_port_zero=zero)
    except ValueError as exc:
        assert str(exc)  # every refusal says why
        return
    assert host and host == host.strip()
    assert (0 if zero else 1) <= port <= 65535
    if ":" in host:
        ipaddress.IPv6Address(host)
    # what parsed is written back as text that parses to the same address
    assert parse_host_port(format_host_port(host, port), allow_port_zero=zero) == (host, port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:53", ("1.2.3.4", 53)),
        ("[::1]:8443", ("::1", 8443)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("example.com:443", ("example.com", 443)),
        ("a.test", ("a.test", 7)),
        ("[::1]", ("::1", 7)),
        ("::1", ("::1", 7)),
        (" host:0080 ", ("host", 80)),
    ],
)
def test_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 7) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("a.test", "missing port"),
        ("[::1]", "missing port"),
        ("a.test:", "port ''"),
        ("a.test:0", "from 1 to 65535"),
        ("a.test:65536", "from 1 to 65535"),
        ("a.test:-1", "from 1 to 65535"),
        ("a.test:1e3", "from 1 to 65535"),
        ("a.test:\u0661\u0662", "from 1 to 65535"),  # Arabic-Indic 12: not a port
        ("a.test:\u00b2", "from 1 to 65535"),  # superscript two
        ("a.test:" + "9" * 5000, "from 1 to 65535"),
        (":53", "missing host"),
        ("[::1", "missing ']'"),
        ("[]:53", "not an IPv6 address"),
        ("[example.com]:53", "not an IPv6 address"),
        ("[1.2.3.4]:53", "not an IPv6 address"),
        ("[::1]53", "unexpected '53' after ']'"),
        ("::1:x", "write IPv6 addresses as [addr]:port"),
        ("::1", "write IPv6 addresses as [addr]:port"),
        ("2001:db8::1:443", "write IPv6 addresses as [addr]:port"),
        ("a:b:80", "write IPv6 addresses as [addr]:port"),
    ],
)
def test_parse_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_host_port(text)


@given(st.ip_addresses(), ports, st.booleans())
def test_a_socket_address_is_written_as_its_peer_would_read_it(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, four_tuple: bool
) -> None:
    """What sockets report (2-tuples for IPv4, 4-tuples for IPv6, IPv4 peers of a dual-stack
    socket as ``::ffff:a.b.c.d``) becomes text that parses back to the peer's own address."""
    # the text a socket gives (inet_ntop writes mapped addresses with the IPv4 dotted)
    text = socket.inet_ntop(socket.AF_INET6, ip.packed) if ip.version == 6 else str(ip)
    sockaddr: tuple[object, ...] = (text, port, 0, 0) if four_tuple else (text, port)
    host, parsed_port = parse_host_port(format_sockaddr(sockaddr))
    assert parsed_port == port
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    assert ipaddress.ip_address(host) == (mapped or ip)


@pytest.mark.parametrize(
    ("sockaddr", "text"),
    [
        (("::ffff:192.0.2.7", 443, 0, 0), "192.0.2.7:443"),  # an IPv4 peer of a dual-stack socket
        (("fe80::1%eth0", 53, 0, 2), "[fe80::1]:53"),  # the scope is the host's, not the peer's
        (("2001:db8::1", 8443), "[2001:db8::1]:8443"),
        (("127.0.0.1", 9), "127.0.0.1:9"),
    ],
)
def test_socket_address_text(sockaddr: tuple[object, ...], text: str) -> None:
    assert format_sockaddr(sockaddr) == text
    assert sockaddr_host(sockaddr[0]) == text.rsplit(":", 1)[0].strip("[]")
