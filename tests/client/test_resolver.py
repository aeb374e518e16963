"""The stub resolver (`ostp_client.dns.resolver`) against a tiny DNS responder on 127.0.0.1.

The responder builds its answers by hand (struct), independently of `ostp_client.dns.codec`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from fuzz.dns_response import test_one_input as fuzz_dns_response
from hypothesis import given, settings
from hypothesis import strategies as st

import ostp_client.dns.resolver as resolver_module
from ostp_client.dns.codec import (
    TYPE_A,
    TYPE_AAAA,
    DnsFormatError,
    build_query,
    parse_query,
    parse_response,
)
from ostp_client.dns.resolver import (
    DnsCache,
    ResolveError,
    StubResolver,
    addresses_in,
    read_nameservers,
)
from ostp_client.flow import Address, ConnContext, HostUnreachable
from ostp_client.outbounds.direct import DirectOutbound, DirectUdpSession
from tests.conftest import is_root, require

A, AAAA, CNAME = 1, 28, 5


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def _rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


@dataclass
class Responder:
    """Answers from ``zone``: name → [(type, ttl, value)], value an address or a CNAME target.

    ``drop`` queries are ignored first; ``wrong_id`` / ``spoof`` send a bad reply (wrong id /
    from another port) before the right one.
    """

    zone: dict[str, list[tuple[int, int, str]]]
    drop: int = 0
    wrong_id: bool = False
    spoof: bool = False
    port: int = 0
    queries: list[tuple[str, int]] = field(default_factory=list)

    def answer(self, data: bytes) -> bytes:
        ident = struct.unpack_from("!H", data)[0]
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        question = data[12 : i + 5]
        name = ".".join(labels).lower()
        qtype = struct.unpack_from("!H", data, i + 1)[0]
        self.queries.append((name, qtype))
        records: list[bytes] = []
        current, owner = name, b"\xc0\x0c"
        while current in self.zone:
            entries = self.zone[current]
            alias = [e for e in entries if e[0] == CNAME]
            if alias:
                _, ttl, target = alias[0]
                records.append(_rr(owner, CNAME, ttl, _name(target)))
                current, owner = target, _name(target)
                continue
            for rtype, ttl, value in entries:
                if rtype == qtype:
                    records.append(_rr(owner, rtype, ttl, ipaddress.ip_address(value).packed))
            break
        rcode = 0 if name in self.zone else 3
        head = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(records), 0, 0)
        return head + question + b"".join(records)


@asynccontextmanager
async def responder(r: Responder) -> AsyncIterator[Responder]:
    async with (
        await anyio.create_udp_socket(local_host="127.0.0.1") as sock,
        await anyio.create_udp_socket(local_host="127.0.0.1") as other,
        anyio.create_task_group() as tg,
    ):
        r.port = sock.extra(anyio.abc.SocketAttribute.local_port)

        async def serve() -> None:
            async for data, (host, port) in sock:
                if r.drop > 0:
                    r.drop -= 1
                    r.queries.append(("<dropped>", 0))
                    continue
                reply = r.answer(data)
                if r.spoof:
                    await other.sendto(reply, host, port)
                if r.wrong_id:
                    await sock.sendto(bytes([reply[0] ^ 0xFF]) + reply[1:], host, port)
                await sock.sendto(reply, host, port)

        tg.start_soon(serve)
        yield r
        tg.cancel_scope.cancel()


def _stub(r: Responder, **kwargs: Any) -> StubResolver:
    return StubResolver(["127.0.0.1"], port=r.port, timeout=kwargs.pop("timeout", 2.0), **kwargs)


ZONE = {
    "origin.test": [(A, 60, "192.0.2.10"), (AAAA, 60, "2001:db8::10")],
    "www.test": [(CNAME, 30, "edge.cdn.test")],
    "edge.cdn.test": [(CNAME, 50, "origin.test")],
    "v4only.test": [(A, 60, "192.0.2.11")],
}


@pytest.mark.anyio
async def test_a_and_aaaa_in_parallel() -> None:
    async with responder(Responder(ZONE)) as r:
        stub = _stub(r)
        assert await stub.resolve("Origin.Test.") == ["2001:db8::10", "192.0.2.10"]
        assert sorted(r.queries) == [("origin.test", A), ("origin.test", AAAA)]
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert await stub.resolve("origin.test", socket.AF_INET6) == ["2001:db8::10"]
        assert len(r.queries) == 2  # both from the cache
        assert await stub.resolve("v4only.test") == ["192.0.2.11"]  # AAAA: NODATA


@pytest.mark.anyio
async def test_cname_chain_in_the_answer() -> None:
    async with responder(Responder(ZONE)) as r:
        stub = _stub(r)
        assert await stub.resolve("www.test", socket.AF_INET) == ["192.0.2.10"]
        # the TTL kept is the chain's smallest (30 s): gone after it, there before
        now = anyio.current_time()
        assert stub.cache.get("www.test", A, now + 29) is not None
        assert stub.cache.get("www.test", A, now + 31) is None


@pytest.mark.anyio
async def test_nxdomain_is_an_error_and_cached() -> None:
    async with responder(Responder(ZONE)) as r:
        stub = _stub(r)
        with pytest.raises(ResolveError, match="no such domain"):
            await stub.resolve("missing.test", socket.AF_INET)
        with pytest.raises(ResolveError):
            await stub.resolve("missing.test", socket.AF_INET)
        assert r.queries == [("missing.test", A)]  # asked once, not retried, then cached


@pytest.mark.anyio
async def test_timeout_then_retry() -> None:
    async with responder(Responder(ZONE, drop=1)) as r:
        stub = _stub(r, timeout=0.3)
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert stub.counters["timeouts"] == 1
        assert r.queries == [("<dropped>", 0), ("origin.test", A)]


@pytest.mark.anyio
async def test_silent_server_fails_after_one_retry_then_next_server() -> None:
    async with responder(Responder(ZONE, drop=2)) as r:
        stub = _stub(r, timeout=0.2)
        with pytest.raises(ResolveError, match="no answer"):
            await stub.resolve("origin.test", socket.AF_INET)
        assert stub.counters["timeouts"] == 2 and len(r.queries) == 2
    async with responder(Responder(ZONE, drop=2)) as r:
        # a second server (the same responder under another loopback address is not
        # reachable; list it twice): after its two timeouts, the next one answers
        stub = StubResolver(["127.0.0.1", "127.0.0.1"], port=r.port, timeout=0.2)
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert stub.counters["timeouts"] == 2


@pytest.mark.anyio
async def test_wrong_id_and_wrong_source_are_ignored() -> None:
    async with responder(Responder(ZONE, wrong_id=True, spoof=True)) as r:
        stub = _stub(r)
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert stub.counters["dropped_replies"] == 2


@pytest.mark.anyio
async def test_question_must_be_echoed() -> None:
    zone = dict(ZONE)
    async with responder(Responder(zone)) as r:
        original = r.answer

        def other_question(data: bytes) -> bytes:
            reply = original(data)
            if len(r.queries) == 1:  # the first reply names another domain
                return reply.replace(_name("origin.test"), _name("evil.test"), 1)
            return reply

        r.answer = other_question  # type: ignore[method-assign]
        stub = _stub(r, timeout=0.3)
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert stub.counters["dropped_replies"] == 1 and stub.counters["timeouts"] == 1


@pytest.mark.anyio
async def test_queries_use_random_ids_and_the_bypass(monkeypatch: pytest.MonkeyPatch) -> None:
    marked: list[int | None] = []

    def fake_bypass(sock: socket.socket, mark: int | None = None) -> bool:
        assert sock.getsockname()[1] == 0  # before bind and send
        marked.append(mark)
        return True

    monkeypatch.setattr(resolver_module, "apply_bypass", fake_bypass)
    ids: set[bytes] = set()
    async with responder(Responder(ZONE)) as r:
        original = r.answer

        def record(data: bytes) -> bytes:
            ids.add(data[:2])
            return original(data)

        r.answer = record  # type: ignore[method-assign]
        stub = _stub(r, cache=DnsCache(capacity=0))
        for _ in range(8):
            await stub.resolve("origin.test", socket.AF_INET, mark=0x2022)
    assert marked == [0x2022] * 8
    assert len(ids) > 1


def test_cache_bounds_and_ttl() -> None:
    cache = DnsCache(capacity=2, max_ttl=100)
    one = [ipaddress.ip_address("192.0.2.1")]
    cache.put("a", A, one, 10, now=0)
    cache.put("b", A, one, 10_000, now=0)
    assert cache.get("a", A, 9.9) == one and cache.get("a", A, 10) is None
    assert cache.get("b", A, 99) == one and cache.get("b", A, 100) is None  # capped at max_ttl
    cache.put("z", A, one, 0, now=0)  # TTL 0: not kept
    assert cache.get("z", A, 0) is None
    for name in "cdef":
        cache.put(name, A, one, 10, now=0)
    assert len(cache) == 2 and cache.get("f", A, 1) == one and cache.get("c", A, 1) is None


@pytest.mark.anyio
async def test_literals_localhost_and_system_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# nothing\nsearch example\noptions ndots:1\n")
    stub = StubResolver(resolv_conf=conf)
    assert await stub.resolve("192.0.2.1") == ["192.0.2.1"]
    assert await stub.resolve("localhost") == ["::1", "127.0.0.1"]
    asked: list[str] = []

    async def fake_getaddrinfo(host: str, port: object, **kwargs: object) -> list[Any]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.99", 0))]

    monkeypatch.setattr(anyio, "getaddrinfo", fake_getaddrinfo)
    assert await stub.resolve("origin.test") == ["192.0.2.99"]
    assert asked == ["origin.test"]


def test_read_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nnameserver 192.0.2.53\nnameserver   fe80::1%eth0\nnameserver bogus\n"
        "search a b\nnameserver 2001:db8::53\nnameserver 192.0.2.54\n"
    )
    assert read_nameservers(conf) == ["192.0.2.53", "fe80::1%eth0", "2001:db8::53"]
    assert read_nameservers(tmp_path / "absent") == []


# -- the codec's new half ---------------------------------------------------------------


def test_build_query_round_trips_and_rejects_bad_names() -> None:
    query = parse_query(build_query(0x1234, "WWW.Example.COM.", TYPE_AAAA))
    assert (query.id, query.name, query.qtype, query.qclass, query.flags) == (
        0x1234,
        "www.example.com",
        TYPE_AAAA,
        1,
        0x0100,
    )
    for bad in ("a" * 64 + ".test", ".".join(["a" * 60] * 5), "a..b", "ünï.test"):
        with pytest.raises(ValueError):
            build_query(1, bad, TYPE_A)


def test_parse_response_rejects_and_skips() -> None:
    reply = Responder(ZONE).answer(build_query(7, "www.test", TYPE_A))
    response = parse_response(reply)
    assert (response.id, response.name, response.rcode) == (7, "www.test", 0)
    assert addresses_in(response, "www.test", TYPE_A) == ([ipaddress.ip_address("192.0.2.10")], 30)
    with pytest.raises(DnsFormatError):
        parse_response(build_query(7, "www.test", TYPE_A))  # a query
    with pytest.raises(DnsFormatError):
        parse_response(reply[:-1])  # truncated record
    bad_len = reply[:-6] + struct.pack("!H", 5) + reply[-4:] + b"\0"
    with pytest.raises(DnsFormatError):
        parse_response(bad_len)
    # a CNAME loop ends; top-bit TTL counts as 0 (RFC 2181 §8)
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, 3, 0, 0) + _name("x.test") + b"\0\1\0\1"
    loop = _rr(b"\xc0\x0c", CNAME, 5, _name("y.test")) + _rr(_name("y.test"), CNAME, 5, b"\xc0\x0c")
    loop += _rr(_name("y.test"), A, 0x80000000, bytes(4))
    response = parse_response(head + loop)
    assert response.answers[2].ttl == 0
    assert addresses_in(response, "x.test", TYPE_A) == ([ipaddress.ip_address("0.0.0.0")], 0)
    assert addresses_in(response, "x.test", TYPE_AAAA) == ([], 0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_dns_response_random(data: bytes) -> None:
    fuzz_dns_response(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_fuzz_dns_response_mutated(noise: bytes, at: int) -> None:
    reply = Responder(ZONE).answer(build_query(7, "www.test", TYPE_A))
    at %= len(reply)
    fuzz_dns_response(reply[:at] + noise + reply[at + len(noise) :])
    fuzz_dns_response(reply[:at])


# -- the direct outbound with a mark ------------------------------------------------------


def _need_root() -> None:
    require(is_root(), "needs root (SO_MARK)")


@pytest.mark.anyio
async def test_direct_with_a_mark_resolves_through_the_stub() -> None:
    _need_root()
    zone = {"svc.test": [(A, 60, "127.0.0.1")]}
    async with (
        responder(Responder(zone)) as r,
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        await anyio.create_udp_socket(local_host="127.0.0.1") as udp_echo,
        anyio.create_task_group() as tg,
    ):
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.send(b"hi " + await stream.receive())

        tg.start_soon(listener.serve, handle)
        out = DirectOutbound(routing_mark=0x77)
        out.resolver = _stub(r)
        ctx = ConnContext(1, "test")
        async with await out.connect_tcp(Address("svc.test", port), ctx) as stream:
            await stream.send(b"there")
            assert await stream.receive() == b"hi there"
        with pytest.raises(HostUnreachable):
            await out.connect_tcp(Address("nope.test", port), ctx)

        session = await out.open_udp(ctx)
        assert isinstance(session, DirectUdpSession)
        async with session:
            udp_port = udp_echo.extra(anyio.abc.SocketAttribute.local_port)
            await session.send_to(Address("svc.test", udp_port), b"ping")
            data, _peer = await udp_echo.receive()
            assert data == b"ping"
        assert ("svc.test", A) in r.queries
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_direct_without_a_mark_keeps_getaddrinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("the stub resolver is for marked sockets only")

    out = DirectOutbound()
    monkeypatch.setattr(out.resolver, "resolve", never)
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.send(b"ok")

        tg.start_soon(listener.serve, handle)
        ctx = ConnContext(1, "test")
        async with await out.connect_tcp(Address("localhost", port), ctx) as stream:
            assert await stream.receive() == b"ok"
        session = await out.open_udp(ctx)
        assert isinstance(session, DirectUdpSession) and session._resolver is None
        await session.aclose()
        tg.cancel_scope.cancel()
