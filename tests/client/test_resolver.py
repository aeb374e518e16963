"""The stub resolver (`ostp_client.dns.resolver`) against a tiny DNS responder on 127.0.0.1.

The responder builds its answers by hand (struct), independently of `ostp_client.dns.codec`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from fuzz.dns_response import QUERY as FUZZ_QUERY
from fuzz.dns_response import test_one_input as fuzz_dns_response
from hypothesis import given, settings
from hypothesis import strategies as st

import ostp_client.dns.resolver as resolver_module
from ostp_client.dns.codec import parse_query
from ostp_client.dns.messages import addresses_in, make_query, read_response
from ostp_client.dns.resolver import (
    TYPE_A,
    TYPE_AAAA,
    DnsCache,
    ResolveError,
    StubResolver,
    candidate_names,
    read_hosts,
    read_nameservers,
    read_resolv_conf,
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


@asynccontextmanager
async def truncating_responder(r: Responder) -> AsyncIterator[tuple[Responder, list[str]]]:
    """UDP answers carry TC and no records; the same port over TCP answers in full (RFC 7766)."""
    tcp_queries: list[str] = []
    for _ in range(20):  # a UDP port whose TCP twin is free
        udp = await anyio.create_udp_socket(local_host="127.0.0.1")
        port = udp.extra(anyio.abc.SocketAttribute.local_port)
        try:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        except OSError:
            await udp.aclose()
            continue
        break
    else:
        pytest.fail("no UDP/TCP port pair free on 127.0.0.1")
    r.port = port

    async def serve_udp() -> None:
        async for data, (host, peer_port) in udp:
            full = r.answer(data)
            end = 12 + full[12:].index(b"\0") + 5  # header and question only
            flags = struct.unpack_from("!H", full, 2)[0] | 0x0200
            head = full[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0)
            await udp.sendto(head + full[12:end], host, peer_port)

    async def serve_tcp(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buffer = b""
            while len(buffer) < 2 or len(buffer) < 2 + struct.unpack_from("!H", buffer)[0]:
                buffer += await stream.receive()
            query = buffer[2:]
            tcp_queries.append(parse_query(query).name)
            reply = r.answer(query)
            await stream.send(struct.pack("!H", len(reply)) + reply)

    async with udp, listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_udp)
        tg.start_soon(listener.serve, serve_tcp)
        yield r, tcp_queries
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_truncated_answer_is_asked_again_over_tcp_on_a_marked_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ostp_client.net.tcp as tcp_module
    from ostp_client.net import bypass

    marked: list[int | None] = []
    real_bypass = bypass.apply_bypass

    def spy(sock: socket.socket, mark: int | None = None) -> bool:
        assert sock.type == socket.SOCK_STREAM
        marked.append(mark)
        return real_bypass(sock, None) if mark is None else True

    monkeypatch.setattr(tcp_module, "apply_bypass", spy)
    async with truncating_responder(Responder(ZONE)) as (r, tcp_queries):
        stub = _stub(r, hosts_file=None)
        assert await stub.resolve("www.test", socket.AF_INET, mark=0x2022) == ["192.0.2.10"]
        assert tcp_queries == ["www.test"]
        assert stub.counters["tcp_fallbacks"] == 1
        assert marked == [0x2022]


@pytest.mark.anyio
async def test_no_tcp_server_after_truncation_is_a_failure_not_a_hang() -> None:
    async with responder(Responder(ZONE)) as r:
        original = r.answer

        def truncated(data: bytes) -> bytes:
            reply = bytearray(original(data))
            reply[2] |= 0x02  # TC
            return bytes(reply)

        r.answer = truncated  # type: ignore[method-assign]
        stub = _stub(r, timeout=0.5, attempts=1, hosts_file=None)
        with pytest.raises(ResolveError, match="no answer"):
            await stub.resolve("origin.test", socket.AF_INET)
        assert stub.counters["tcp_fallbacks"] == 1
        assert stub.counters["server_failures"] + stub.counters["timeouts"] == 1


@pytest.mark.anyio
async def test_hosts_file_is_read_before_dns(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# comment\n192.0.2.77  printer.lan printer  # trailing\n"
        "2001:db8::77 printer.lan\nnot-an-address ignored.lan\n192.0.2.78\n"
    )
    assert read_hosts(hosts)["printer"] == [ipaddress.ip_address("192.0.2.77")]
    assert "ignored.lan" not in read_hosts(hosts)
    assert read_hosts(tmp_path / "absent") == {}
    async with responder(Responder(ZONE)) as r:
        stub = _stub(r, hosts_file=hosts)
        assert await stub.resolve("Printer.LAN.") == ["2001:db8::77", "192.0.2.77"]
        assert await stub.resolve("printer", socket.AF_INET) == ["192.0.2.77"]
        assert r.queries == []  # DNS was not asked
        assert await stub.resolve("origin.test", socket.AF_INET) == ["192.0.2.10"]
        assert r.queries == [("origin.test", A)]


@pytest.mark.anyio
async def test_search_list_and_ndots_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nsearch cdn.test test\noptions ndots:2 rotate\n")
    parsed = read_resolv_conf(conf)
    assert (parsed.nameservers, parsed.search, parsed.ndots) == (
        ["127.0.0.1"],
        ["cdn.test", "test"],
        2,
    )
    assert candidate_names("edge", ["a", "b"], 1) == ["edge.a", "edge.b", "edge"]
    assert candidate_names("x.y.z", ["a"], 2) == ["x.y.z", "x.y.z.a"]
    assert candidate_names("edge.", ["a"], 1) == ["edge"]
    async with responder(Responder(ZONE)) as r:
        stub = StubResolver(resolv_conf=conf, port=r.port, hosts_file=None)
        # "edge" has fewer dots than ndots: edge.cdn.test is asked first (a CNAME to origin)
        assert await stub.resolve("edge", socket.AF_INET) == ["192.0.2.10"]
        assert r.queries == [("edge.cdn.test", A)]
        # "origin" is not under cdn.test (NXDOMAIN), then origin.test answers
        assert await stub.resolve("origin", socket.AF_INET) == ["192.0.2.10"]
        assert r.queries[1:] == [("origin.cdn.test", A), ("origin.test", A)]
        # absolute: no search
        with pytest.raises(ResolveError):
            await stub.resolve("origin.", socket.AF_INET)


@pytest.mark.anyio
async def test_unicode_names_are_asked_with_idna() -> None:
    zone = {"xn--bcher-kva.test": [(A, 60, "192.0.2.44")]}
    async with responder(Responder(zone)) as r:
        stub = _stub(r, hosts_file=None)
        assert await stub.resolve("Bücher.test", socket.AF_INET) == ["192.0.2.44"]
        assert r.queries == [("xn--bcher-kva.test", A)]


# -- queries and replies (dnspython) -----------------------------------------------------


def test_make_query_encodes_and_rejects_bad_names() -> None:
    query = parse_query(make_query("WWW.Example.COM.", TYPE_AAAA).to_wire())
    assert (query.name, query.qtype, query.qclass, query.flags) == (
        "www.example.com",
        TYPE_AAAA,
        1,
        0x0100,
    )
    # IDNA 2008 (UTS #46): a Unicode name is asked in its ASCII form
    assert parse_query(make_query("Bücher.test", TYPE_A).to_wire()).name == "xn--bcher-kva.test"
    ids = {make_query("x.test", TYPE_A).id for _ in range(16)}
    assert len(ids) > 1
    for bad in ("a" * 64 + ".test", ".".join(["a" * 60] * 5), "a..b", "a_\u2028.test"):
        with pytest.raises(ValueError, match="not a name DNS can carry"):
            make_query(bad, TYPE_A)


def test_read_response_rejects_and_skips() -> None:
    query = make_query("www.test", TYPE_A)
    reply = Responder(ZONE).answer(query.to_wire())
    response = read_response(query, reply)
    assert response is not None and response.rcode() == 0
    assert addresses_in(response, TYPE_A) == ([ipaddress.ip_address("192.0.2.10")], 30)
    assert read_response(query, query.to_wire()) is None  # a query
    assert read_response(query, reply[:-1]) is None  # truncated record
    assert read_response(make_query("www.test", TYPE_A), reply) is None  # another id
    bad_len = reply[:-6] + struct.pack("!H", 5) + reply[-4:] + b"\0"
    assert read_response(query, bad_len) is None
    # a CNAME loop ends; top-bit TTL counts as 0 (RFC 2181 §8)
    loop_query = make_query("x.test", TYPE_A)
    head = struct.pack("!HHHHHH", loop_query.id, 0x8180, 1, 3, 0, 0) + _name("x.test")
    head += b"\0\1\0\1"
    loop = _rr(b"\xc0\x0c", CNAME, 5, _name("y.test")) + _rr(_name("y.test"), CNAME, 5, b"\xc0\x0c")
    loop += _rr(_name("y.test"), A, 0x80000000, bytes(4))
    response = read_response(loop_query, head + loop)
    assert response is not None
    assert addresses_in(response, TYPE_A) == ([ipaddress.ip_address("0.0.0.0")], 0)
    assert addresses_in(response, TYPE_AAAA) == ([], 0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_dns_response_random(data: bytes) -> None:
    fuzz_dns_response(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_fuzz_dns_response_mutated(noise: bytes, at: int) -> None:
    reply = Responder(ZONE).answer(FUZZ_QUERY.to_wire())
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


def test_dnspython_is_imported_with_the_first_query_not_with_the_daemon() -> None:
    """dnspython's message modules cost the daemon's start about 64 ms; a daemon that never
    sends a query through the stub resolver (no routing mark in effect) does not load them."""
    code = (
        "import sys\n"
        "import ostp_client.cli, ostp_client.daemon, ostp_client.outbounds.direct\n"
        "import ostp_client.dns.resolver\n"
        "print(sorted(m for m in sys.modules if m == 'dns' or m.startswith('dns.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.anyio
async def test_a_query_that_cannot_open_its_socket_is_a_resolve_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query's socket can fail before anything is sent (no descriptor left, the routing mark
    refused): the name is unresolvable, a ResolveError the `direct` outbound turns into "host
    unreachable", never an ExceptionGroup out of the A/AAAA task group."""

    def refused(sock: socket.socket, mark: int | None) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(resolver_module, "apply_bypass", refused)
    async with responder(Responder(ZONE)) as r:
        stub = _stub(r)
        with pytest.raises(ResolveError, match="Operation not permitted"):
            await stub.resolve("origin.test")
        assert r.queries == []
