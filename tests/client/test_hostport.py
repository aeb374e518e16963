"""`host:port` text: the one parser and formatter the client uses (issue 14)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.control.protocol import format_bytes
from ostp_client.hostport import format_host_port, parse_host_port

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)
ports = st.integers(min_value=1, max_value=65535)


@given(hosts, ports)
def test_format_then_parse_gives_the_address_back(host: str, port: int) -> None:
    text = format_host_port(host, port)
    assert parse_host_port(text) == (host, port)
    if ":" in host:
        assert text.startswith("[")
        assert ipaddress.ip_address(host).version == 6


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4:53", ("1.2.3.4", 53)), ("[::1]:8443", ("::1", 8443)), ("a.test", ("a.test", 7))],
)
def test_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 7) == expected


@pytest.mark.parametrize("text", ["", "a.test", "a.test:0", "a.test:65536", "[::1", "::1:x", ":53"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_format_bytes_is_shared_by_ctl_and_the_tui() -> None:
    from ostp_tui import widgets

    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**4) == "3072.0 GiB"
    assert widgets.format_rate(2048) == "2.0 KiB/s"
