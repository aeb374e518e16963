"""HTTP proxy on h11: `CONNECT host:port` tunnels and absolute-URI requests (RFC 9110, 9112).

h11 parses and frames the messages on both sides (client ↔ proxy, proxy ↔ origin). What is
hand-written here is small glue, all pure functions fuzzed by `fuzz/http_request.py`:
`parse_authority`, `parse_absolute_uri`, `forward_headers`, `parse_proxy_authorization`,
`transfer_coding_status`.

Message framing (RFC 9112 §6): h11 refuses what cannot be framed (conflicting or non-numeric
Content-Length, transfer codings other than chunked, bad chunk lines); such a request gets a
400 (or 501 for a coding it does not know) and the connection closes. A message with both
Transfer-Encoding and Content-Length is framed by Transfer-Encoding and forwarded without
Content-Length (§6.1); the client connection closes after that response (§6.3), so a request
smuggled behind it is never read.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import anyio
import anyio.abc
import h11

from ostp_client.connections import (
    EXPECTED_STREAM_ERRORS,
    READ_SIZE,
    Dispatcher,
    relay_streams,
    reset_on_close,
)
from ostp_client.errors import OstpClientError
from ostp_client.flow import (
    Address,
    Blocked,
    ConnContext,
    ConnectTimeout,
    OutboundError,
)
from ostp_client.inbounds.base import ProxySettings, check_user

__all__ = [
    "HttpProxyError",
    "forward_headers",
    "handle_http",
    "parse_absolute_uri",
    "parse_authority",
    "parse_proxy_authorization",
    "status_for_error",
    "transfer_coding_status",
]

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16384
PROXY_AGENT = (b"proxy-agent", b"ostp-client")
# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",  # answered here with 100 Continue, not forwarded
    }
)

Headers = list[tuple[bytes, bytes]]


class HttpProxyError(OstpClientError, ValueError):
    """A request the proxy cannot serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_for_error(exc: OutboundError) -> int:
    if isinstance(exc, Blocked):
        return 403
    if isinstance(exc, ConnectTimeout):
        return 504
    return 502


def _valid_host(host: str) -> str:
    if not host or any(c in host for c in " \t\r\n/\\@?#%[]") or any(ord(c) < 0x20 for c in host):
        raise HttpProxyError(400, f"invalid host {host!r}")
    return host


def parse_authority(text: str, default_port: int) -> Address:
    """`host[:port]` / `[v6][:port]` of a CONNECT target or a URI (RFC 3986 §3.2)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HttpProxyError(400, f"bad authority {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if Address(host or "x", 0).ip is None or ":" not in host:
            raise HttpProxyError(400, f"bad IPv6 address in {text!r}")
        if rest and not rest.startswith(":"):
            raise HttpProxyError(400, f"bad authority {text!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise HttpProxyError(400, f"IPv6 address without brackets in {text!r}")
        host = _valid_host(host)
    if port_text == "":
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise HttpProxyError(400, f"bad port in {text!r}")
    return Address(host.lower() if Address(host, 0).ip is None else host, port)


def parse_absolute_uri(target: str) -> tuple[Address, str]:
    """`http://host[:port]/path?q` → (origin address, origin-form `/path?q`)."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HttpProxyError(400, "a proxy request needs an absolute URI (http://host/...)")
    scheme = scheme.lower()
    if scheme == "https":
        raise HttpProxyError(400, "https:// URIs must be tunnelled with CONNECT")
    if scheme != "http":
        raise HttpProxyError(400, f"unsupported scheme {scheme!r}")
    cut = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if index >= 0:
            cut = min(cut, index)
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:  # userinfo is deprecated in http URIs (RFC 9110 §4.2.4)
        authority = authority.rpartition("@")[2]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return parse_authority(authority, 80), path


def forward_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop fields, those named in Connection, and every Proxy-* field.

    With Transfer-Encoding, Content-Length goes too (RFC 9112 §6.1: the body was framed by
    Transfer-Encoding; forwarding both is how requests are smuggled).
    """
    items = [(name.lower(), value) for name, value in headers]
    drop = set(HOP_BY_HOP)
    for name, value in items:
        if name == b"connection":
            drop.update(token.strip().lower() for token in value.split(b",") if token.strip())
        elif name == b"transfer-encoding":
            drop.add(b"content-length")
    return [
        (name, value)
        for name, value in items
        if name not in drop and not name.startswith(b"proxy-")
    ]


def parse_proxy_authorization(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """(user, password) from `Proxy-Authorization: Basic ...` (RFC 7617), or None."""
    for name, value in headers:
        if name.lower() != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        return (user, password) if sep else None
    return None


def transfer_coding_status(head: bytes) -> int:
    """The status for a request head whose Transfer-Encoding h11 refused (RFC 9112 §6.1, §6.3).

    400 when chunked is not the last coding (or appears twice): the body length cannot be
    known. 501 when chunked is last but an earlier coding is one we do not implement.
    """
    codings: list[bytes] = []
    in_field = False
    for line in head.lstrip(b"\r\n").split(b"\n")[1:]:
        if not line.strip():
            break  # the end of the head
        if line[:1] in (b" ", b"\t"):  # obs-fold: the previous field goes on (RFC 9112 §5.2)
            value = line if in_field else b""
        else:
            name, sep, value = line.partition(b":")
            in_field = bool(sep) and name.strip().lower() == b"transfer-encoding"
            if not in_field:
                continue
        codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
    if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
        return 400
    return 501


def _header(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value
    return None


# --------------------------------------------------------------------------------------------
# the anyio shell


async def _next_event(
    conn: h11.Connection,
    stream: anyio.abc.ByteReceiveStream,
    record: bytearray | None = None,
    *,
    broken_is_eof: bool = True,
) -> object:
    """The next h11 event, reading as needed; the bytes received meanwhile are added to
    `record` when given. A stream that broke counts as closed unless ``broken_is_eof`` is False
    (the origin's side: a tunnel that broke mid-body must not pass for the end of a
    close-delimited body), then BrokenResourceError propagates."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(READ_SIZE)
        except anyio.EndOfStream:
            data = b""
        except anyio.BrokenResourceError:
            if not broken_is_eof:
                raise
            data = b""
        if record is not None:
            record += data
        conn.receive_data(data)


async def _send_error(
    conn: h11.Connection,
    stream: anyio.abc.ByteSendStream,
    status: int,
    message: str,
    extra: Headers | None = None,
    close: bool = True,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{status} {message}\n".encode()
    headers: Headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        PROXY_AGENT,
        *(extra or []),
    ]
    if close:
        headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send(data)


_AT_REST = {h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED}
"""h11 states of an origin connection with no exchange in progress."""


@dataclass(slots=True)
class _Upstream:
    target: Address
    stream: anyio.abc.ByteStream
    conn: h11.Connection


class _HttpSession:
    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        ctx: ConnContext,
        dispatcher: Dispatcher,
        settings: ProxySettings,
    ) -> None:
        self.stream = stream
        self.ctx = ctx
        self.dispatcher = dispatcher
        self.users: Mapping[str, bytes] = settings.users
        self.timeout = settings.handshake_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.upstream: _Upstream | None = None

    async def close_upstream(self, reset: bool = False) -> None:
        """Close the origin connection; ``reset`` when an exchange on it did not complete."""
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            if reset or not {upstream.conn.our_state, upstream.conn.their_state} <= _AT_REST:
                reset_on_close(upstream.stream)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await upstream.stream.aclose()

    async def serve(self, initial: bytes) -> None:
        self.conn.receive_data(initial)
        ended = False
        try:
            await self._serve()
            ended = True
        finally:
            await self.close_upstream(reset=not ended)

    async def _serve(self) -> None:
        while True:
            # the head as received (at most MAX_HEADER_BYTES + READ_SIZE), to tell why h11
            # refused a Transfer-Encoding
            head = bytearray(self.conn.trailing_data[0])
            try:
                with anyio.fail_after(self.timeout):
                    event = await _next_event(self.conn, self.stream, head)
            except TimeoutError:
                logger.debug("#%d HTTP: client idle, closing", self.ctx.id)
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 501:  # h11 says so only for Transfer-Encoding
                    status = transfer_coding_status(bytes(head))
                await _send_error(self.conn, self.stream, status, f"Bad request: {exc}")
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            try:
                if not await self.handle_request(event):
                    return
            except h11.RemoteProtocolError as exc:
                logger.debug("#%d HTTP: bad request body: %s", self.ctx.id, exc)
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def _authorized(self, request: h11.Request) -> bool:
        if not self.users:
            return True
        creds = parse_proxy_authorization(request.headers)
        if creds is not None:
            user = check_user(self.users, *creds)
            if user is not None:
                self.ctx.user = user
                return True
        has_body = _header(request.headers, b"content-length") not in (None, b"0") or (
            _header(request.headers, b"transfer-encoding") is not None
        )
        await _send_error(
            self.conn,
            self.stream,
            407,
            "Proxy Authentication Required",
            [(b"proxy-authenticate", b'Basic realm="ostp-client"')],
            close=has_body or request.method == b"CONNECT",
        )
        if not has_body and self.conn.their_state is not h11.DONE:
            await _next_event(self.conn, self.stream)  # the EndOfMessage of a bodyless request
        return False

    async def handle_request(self, request: h11.Request) -> bool:
        """Serve one request; False when the client connection must end afterwards."""
        if not await self._authorized(request):
            return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        try:
            target_text = request.target.decode("ascii")
        except UnicodeDecodeError:
            await _send_error(self.conn, self.stream, 400, "non-ASCII request target")
            return False
        if request.method == b"CONNECT":
            await self.connect(target_text)
            return False
        try:
            target, path = parse_absolute_uri(target_text)
        except HttpProxyError as exc:
            await _send_error(self.conn, self.stream, exc.status, str(exc))
            return False
        return await self.forward(request, target, path)

    async def _open(self, target: Address) -> anyio.abc.ByteStream | None:
        try:
            return await self.dispatcher.connect_tcp(self.ctx, target)
        except OutboundError as exc:
            status = status_for_error(exc)
            log = logger.info if status == 403 else logger.debug
            log("#%d HTTP %s via %s failed: %s", self.ctx.id, target, self.ctx.outbound_tag, exc)
            await _send_error(
                self.conn, self.stream, status, str(exc) if status != 403 else "Blocked"
            )
            return None

    async def connect(self, target_text: str) -> None:
        try:
            target = parse_authority(target_text, 443)
        except HttpProxyError as exc:
            await _send_error(self.conn, self.stream, exc.status, str(exc))
            return
        remote = await self._open(target)
        if remote is None:
            return
        async with remote:
            data = self.conn.send(
                h11.Response(
                    status_code=200, reason=b"Connection Established", headers=[PROXY_AGENT]
                )
            )
            await self.stream.send(data or b"")
            leftover, _closed = self.conn.trailing_data
            if leftover:
                await remote.send(bytes(leftover))
                self.ctx.bytes_up += len(leftover)
            await relay_streams(self.stream, remote, self.ctx)

    async def forward(self, request: h11.Request, target: Address, path: str) -> bool:
        conn = self.conn
        headers = forward_headers(request.headers)
        if _header(headers, b"host") is None:
            host = (
                target.host if target.ip is None or ":" not in target.host else f"[{target.host}]"
            )
            headers.insert(
                0, (b"host", (host if target.port == 80 else f"{host}:{target.port}").encode())
            )
        chunked = _header(request.headers, b"transfer-encoding") is not None
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))  # h11 re-frames the body
        # RFC 9112 §6.3: after a request framed by Transfer-Encoding that also had a
        # Content-Length, answer it and close (what followed it may be a smuggled request)
        ambiguous = chunked and _header(request.headers, b"content-length") is not None
        if self.upstream is not None and self.upstream.target != target:
            await self.close_upstream()
        if self.upstream is None:
            remote = await self._open(target)
            if remote is None:
                return False
            self.upstream = _Upstream(target, remote, h11.Connection(h11.CLIENT))
        else:
            self.dispatcher.route(self.ctx, target, "tcp")  # keep the registry's view current
        upstream = self.upstream
        if conn.they_are_waiting_for_100_continue:
            await self.stream.send(
                conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        try:
            await self._send_request(request, headers, path, upstream)
        except h11.RemoteProtocolError as exc:
            # the client's body cannot be framed (a bad chunk line...): the origin got part
            # of a request, so its connection goes too
            logger.debug("#%d HTTP: bad request body: %s", self.ctx.id, exc)
            await self.close_upstream()
            await _send_error(conn, self.stream, 400, f"Bad request body: {exc}")
            return False
        except (h11.LocalProtocolError, *EXPECTED_STREAM_ERRORS) as exc:
            logger.debug("#%d HTTP upstream %s: %r", self.ctx.id, target, exc)
            await self.close_upstream(reset=True)
            await _send_error(conn, self.stream, 502, f"Bad Gateway: {target} closed")
            return False
        return await self._relay_response(upstream, close=ambiguous) and not ambiguous

    async def _send_request(
        self, request: h11.Request, headers: Headers, path: str, upstream: _Upstream
    ) -> None:
        out = upstream.conn.send(
            h11.Request(method=request.method, target=path.encode(), headers=headers)
        )
        await upstream.stream.send(out or b"")
        while True:
            event = await _next_event(self.conn, self.stream)
            if isinstance(event, h11.Data):
                chunk = upstream.conn.send(h11.Data(data=event.data))
                if chunk:
                    await upstream.stream.send(chunk)
                self.ctx.bytes_up += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                out = upstream.conn.send(h11.EndOfMessage())
                if out:
                    await upstream.stream.send(out)
                return
            else:
                raise anyio.EndOfStream  # the client went away mid-body

    async def _relay_response(self, upstream: _Upstream, *, close: bool = False) -> bool:
        """Relay the origin's response; False when the client connection must end.

        ``close`` adds ``Connection: close``: this response is the connection's last.
        """
        conn = self.conn
        started = False
        try:
            while True:
                event = await _next_event(upstream.conn, upstream.stream, broken_is_eof=False)
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code != 101:
                        info = h11.InformationalResponse(
                            status_code=event.status_code,
                            headers=forward_headers(event.headers),
                            reason=event.reason,
                        )
                        await self.stream.send(conn.send(info) or b"")
                elif isinstance(event, h11.Response):
                    started = True
                    headers = forward_headers(event.headers)
                    if close:
                        headers.append((b"connection", b"close"))
                    response = h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                    await self.stream.send(conn.send(response) or b"")
                elif isinstance(event, h11.Data):
                    await self.stream.send(conn.send(h11.Data(data=event.data)) or b"")
                    self.ctx.bytes_down += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    await self.stream.send(conn.send(h11.EndOfMessage()) or b"")
                    break
                else:  # ConnectionClosed before the response was complete
                    raise anyio.EndOfStream
        except (h11.RemoteProtocolError, anyio.EndOfStream, *EXPECTED_STREAM_ERRORS) as exc:
            logger.debug("#%d HTTP response from %s: %r", self.ctx.id, upstream.target, exc)
            await self.close_upstream(reset=True)
            if started:
                # Part of the response went out: the client must see a reset, not an end
                # that may pass for the whole body (close-delimited, or chunked then FIN).
                reset_on_close(self.stream)
            else:
                await _send_error(conn, self.stream, 502, f"Bad Gateway: {upstream.target}")
            return False
        if upstream.conn.our_state is h11.DONE and upstream.conn.their_state is h11.DONE:
            upstream.conn.start_next_cycle()
        else:
            await self.close_upstream()
        return True


async def handle_http(
    stream: anyio.abc.ByteStream,
    initial: bytes,
    ctx: ConnContext,
    dispatcher: Dispatcher,
    settings: ProxySettings,
) -> None:
    """Serve one HTTP proxy client connection whose first bytes are `initial`."""
    await _HttpSession(stream, ctx, dispatcher, settings).serve(initial)
