"""The HTTP proxy's hand-written glue: target parsing and header filtering (h11 does the rest)."""

from __future__ import annotations

import base64

import pytest
from fuzz.http_request import test_one_input as fuzz_http
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.flow import Address
from ostp_client.inbounds.proxy.http import (
    HOP_BY_HOP,
    HttpProxyError,
    forward_headers,
    parse_absolute_uri,
    parse_authority,
    parse_proxy_authorization,
)

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
domains = st.lists(_label, min_size=1, max_size=5).map(".".join)
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), domains)
ports = st.integers(1, 65535)


def _authority(host: str, port: int | None) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


@given(hosts, st.one_of(st.none(), ports))
def test_authority_round_trip(host: str, port: int | None) -> None:
    assert parse_authority(_authority(host, port), 443) == Address(host, port or 443)


@given(hosts, st.one_of(st.none(), ports), st.text(alphabet="abc/?=&", max_size=20))
def test_absolute_uri(host: str, port: int | None, path: str) -> None:
    target, origin_form = parse_absolute_uri(f"http://{_authority(host, port)}/{path}")
    assert target == Address(host, port or 80)
    assert origin_form == "/" + path.partition("#")[0]


@pytest.mark.parametrize(
    "text",
    ["", ":80", "host:0", "host:65536", "host:x", "[::1", "[nothost]:80", "a b:80", "::1:80"],
)
def test_bad_authorities(text: str) -> None:
    with pytest.raises(HttpProxyError):
        parse_authority(text, 80)


@pytest.mark.parametrize(
    ("uri", "status"),
    [("/path", 400), ("https://x/", 400), ("ftp://x/", 400), ("http:///", 400)],
)
def test_bad_absolute_uris(uri: str, status: int) -> None:
    with pytest.raises(HttpProxyError) as info:
        parse_absolute_uri(uri)
    assert info.value.status == status


def test_absolute_uri_details() -> None:
    assert parse_absolute_uri("HTTP://User@Example.COM?q=1#frag") == (
        Address("example.com", 80),
        "/?q=1",
    )


header_names = st.one_of(
    st.sampled_from(
        [
            *sorted(HOP_BY_HOP),
            b"proxy-authorization",
            b"proxy-x",
            b"x-a",
            b"host",
            b"Content-Length",
        ]
    ),
    st.binary(min_size=1, max_size=10),
)


@given(st.lists(st.tuples(header_names, st.binary(max_size=30)), max_size=12))
def test_forward_headers_drops_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> None:
    kept = forward_headers(headers)
    named = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")}
    for name, _ in kept:
        assert name not in HOP_BY_HOP
        assert not name.startswith(b"proxy-")
        assert name not in named
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        assert b"content-length" not in [name for name, _ in kept]  # RFC 9112 §6.1
    assert len(kept) <= len(headers)


def test_proxy_authorization() -> None:
    token = base64.b64encode(b"alice:pa:ss")
    assert parse_proxy_authorization([(b"Proxy-Authorization", b"Basic " + token)]) == (
        b"alice",
        b"pa:ss",
    )
    assert parse_proxy_authorization([(b"proxy-authorization", b"Bearer x")]) is None
    assert parse_proxy_authorization([(b"proxy-authorization", b"Basic !!!")]) is None
    assert parse_proxy_authorization([]) is None


@given(st.binary(max_size=400))
def test_fuzz_entry_point(data: bytes) -> None:
    fuzz_http(data)


@given(st.sampled_from([b"GET", b"POST", b"CONNECT", b"PUT"]), st.binary(max_size=60))
def test_fuzz_entry_point_on_request_heads(method: bytes, target: bytes) -> None:
    fuzz_http(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: a, b\r\n\r\n")
