"""HTTP proxy message framing (RFC 9112 §6) against the real inbound and a raw origin.

The origin is an in-test TCP server that parses what the proxy forwards with h11 and records
every request head and body, so the tests see exactly what crossed the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import h11
import pytest

from ostp_client.inbounds.proxy.http import forward_headers, transfer_coding_status
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound
from tests.client.proxy_helpers import base_config, proxy_port, running_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class RawOrigin:
    port: int
    response: bytes
    requests: list[Seen] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)

    async def serve(self, stream: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            current: Seen | None = None
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:  # the proxy hung up mid-request
                    return
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        data = b""
                    self.raw += data
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    current = Seen(event.method, event.target, list(event.headers), b"")
                elif isinstance(event, h11.Data) and current is not None:
                    current.body += event.data
                elif isinstance(event, h11.EndOfMessage) and current is not None:
                    self.requests.append(current)
                    await stream.send(self.response)
                    return  # one request per connection is enough here
                else:
                    return


@asynccontextmanager
async def raw_origin(response: bytes) -> AsyncIterator[RawOrigin]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    origin = RawOrigin(port, response)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, origin.serve)
        try:
            yield origin
        finally:
            tg.cancel_scope.cancel()


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _exchange(port: int, request: bytes) -> bytes:
    """Send `request`, return everything the proxy answers until it closes."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    received = b""
    async with stream:
        await stream.send(request)
        with anyio.fail_after(15):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


def _inbound(daemon: object) -> LocalProxyInbound:
    inbound = daemon.inbounds["proxy-in"]  # type: ignore[attr-defined]
    assert isinstance(inbound, LocalProxyInbound)
    return inbound


def _names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


async def test_content_length_with_chunked_is_dropped_and_the_connection_closes() -> None:
    async with raw_origin(OK_RESPONSE) as origin, running_daemon(base_config()) as daemon:
        where = f"127.0.0.1:{origin.port}"
        smuggled = f"GET http://{where}/smuggled HTTP/1.1\r\nHost: {where}\r\n\r\n"
        request = (
            f"POST http://{where}/upload HTTP/1.1\r\nHost: {where}\r\n"
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"5\r\nhello\r\n0\r\n\r\n{smuggled}"
        ).encode()
        answer = await _exchange(proxy_port(daemon), request)
        assert answer.startswith(b"HTTP/1.1 200 ")
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"connection: close" in head
        assert answer.count(b"HTTP/1.1 ") == 1  # the pipelined GET was never read
        assert len(origin.requests) == 1
        seen = origin.requests[0]
        assert (seen.method, seen.target, seen.body) == (b"POST", b"/upload", b"hello")
        assert b"content-length" not in _names(seen.headers)
        assert (b"transfer-encoding", b"chunked") in seen.headers
        assert b"/smuggled" not in bytes(origin.raw)
        assert _inbound(daemon).failed_handlers == 0


async def test_a_response_with_both_framings_is_relayed_by_its_chunks() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with raw_origin(response) as origin, running_daemon(base_config()) as daemon:
        where = f"127.0.0.1:{origin.port}"
        request = f"GET http://{where}/ HTTP/1.1\r\nHost: {where}\r\nConnection: close\r\n\r\n"
        answer = await _exchange(proxy_port(daemon), request.encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length" not in head.lower()
        decoded = h11.Connection(h11.CLIENT)
        decoded.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        decoded.send(h11.EndOfMessage())
        decoded.receive_data(answer)
        decoded.receive_data(b"")
        data = b""
        while not isinstance(event := decoded.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                data += event.data
        assert data == b"hello world", body
        assert _inbound(daemon).failed_handlers == 0


@pytest.mark.parametrize(
    "chunk_line",
    [
        b"zz",  # not hex
        b"-5",  # negative
        b"0x5",
        b"1" * 21,  # more digits than any size needs (overflow)
        b"",  # no size at all
        # a chunk line longer than one read and than what the proxy buffers of a line
        b"5;" + b"a" * 100_000,
    ],
)
async def test_a_bad_chunk_size_gets_400_and_a_close(chunk_line: bytes) -> None:
    async with raw_origin(OK_RESPONSE) as origin, running_daemon(base_config()) as daemon:
        where = f"127.0.0.1:{origin.port}"
        request = (
            (
                f"POST http://{where}/ HTTP/1.1\r\nHost: {where}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + chunk_line
            + b"\r\nhello\r\n0\r\n\r\n"
        )
        answer = await _exchange(proxy_port(daemon), request)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert origin.requests == []  # the origin never got a complete request
        assert _inbound(daemon).failed_handlers == 0


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
        (b"Content-Length: 5, 6\r\n", 400),
        (b"Content-Length: abc\r\n", 400),
        (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: +5\r\n", 400),
        (b"Transfer-Encoding: chunked, gzip\r\n", 400),  # chunked not last: §6.3
        (b"Transfer-Encoding: gzip\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),  # a coding we do not know: §6.1
        (b"Transfer-Encoding: gzip,\r\n chunked\r\n", 501),  # the same, folded
    ],
)
async def test_unframeable_request_heads(fields: bytes, status: int) -> None:
    async with raw_origin(OK_RESPONSE) as origin, running_daemon(base_config()) as daemon:
        where = f"127.0.0.1:{origin.port}".encode()
        request = b"POST http://" + where + b"/ HTTP/1.1\r\nHost: " + where + b"\r\n"
        answer = await _exchange(proxy_port(daemon), request + fields + b"\r\nhello")
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
        assert origin.requests == [] and bytes(origin.raw) == b""
        assert _inbound(daemon).failed_handlers == 0


async def test_obs_fold_is_unfolded_before_forwarding() -> None:
    async with raw_origin(OK_RESPONSE) as origin, running_daemon(base_config()) as daemon:
        where = f"127.0.0.1:{origin.port}"
        request = (
            f"GET http://{where}/ HTTP/1.1\r\nHost: {where}\r\n"
            "X-Folded: one\r\n two\r\nConnection: close\r\n\r\n"
        ).encode()
        answer = await _exchange(proxy_port(daemon), request)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert (b"x-folded", b"one two") in origin.requests[0].headers
        assert b"\r\n two" not in bytes(origin.raw)


def test_forward_headers_drops_content_length_only_with_transfer_encoding() -> None:
    both = [(b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
    assert forward_headers(both) == [(b"x-a", b"1")]
    assert forward_headers([(b"Content-Length", b"4")]) == [(b"content-length", b"4")]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: GZIP ,Chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nX: y\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nTransfer-Encoding: chunked", 400),
        (b"\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: br, chunked\r\n\r\n", 501),
        (b"", 400),
    ],
)
def test_transfer_coding_status(head: bytes, status: int) -> None:
    assert transfer_coding_status(head) == status
