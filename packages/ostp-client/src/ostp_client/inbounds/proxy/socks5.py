"""SOCKS5 (RFC 1928) with username/password (RFC 1929): a sans-IO codec and the anyio handler.

The codec functions take bytes and return `(value, bytes_used)` or None when more input is
needed; malformed input raises `Socks5Error` carrying the reply code to send (the only
exception they raise, see `fuzz/socks5_request.py`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ostp_client.connections import EXPECTED_STREAM_ERRORS, Dispatcher, relay_streams
from ostp_client.errors import OstpClientError
from ostp_client.flow import (
    Address,
    Blocked,
    ConnContext,
    ConnectionRefused,
    ConnectTimeout,
    GeneralFailure,
    HostUnreachable,
    NetworkUnreachable,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.inbounds.base import ProxySettings, check_user

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "Greeting",
    "Request",
    "Socks5Error",
    "UdpPacket",
    "UserPass",
    "encode_address",
    "encode_reply",
    "encode_udp_packet",
    "handle_socks5",
    "parse_greeting",
    "parse_request",
    "parse_udp_packet",
    "parse_userpass",
    "reply_for_error",
]

logger = logging.getLogger(__name__)

VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929 §2
METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF  # RFC 1928 §3
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
# RFC 1928 §6 replies
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

_REPLY_FOR_ERROR: dict[type[OutboundError], int] = {
    Blocked: REP_NOT_ALLOWED,
    NetworkUnreachable: REP_NETWORK_UNREACHABLE,
    HostUnreachable: REP_HOST_UNREACHABLE,
    ConnectionRefused: REP_CONNECTION_REFUSED,
    ConnectTimeout: REP_TTL_EXPIRED,
    GeneralFailure: REP_GENERAL_FAILURE,
}

MAX_HANDSHAKE_BYTES = 1024  # greeting ≤ 257, auth ≤ 513, request ≤ 262


def reply_for_error(exc: OutboundError) -> int:
    for kind in type(exc).__mro__:
        code = _REPLY_FOR_ERROR.get(kind)
        if code is not None:
            return code
    return REP_GENERAL_FAILURE


class Socks5Error(OstpClientError):
    """The client sent something we cannot accept; `reply` is the code to answer with, or
    None to close without a reply (a sub-negotiation that is not RFC 1929's)."""

    def __init__(self, reply: int | None, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Greeting:
    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class UserPass:
    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Request:
    command: int
    target: Address


@dataclass(frozen=True, slots=True)
class UdpPacket:
    frag: int
    target: Address
    payload: bytes


# Characters a host name may not contain (it would change the meaning of "host:port" text).
_BAD_NAME = re.compile(r"[\x00-\x20\x7f/\\@\[\]%?#]")


def parse_greeting(buf: bytes) -> tuple[Greeting, int] | None:
    """`VER NMETHODS METHODS` (RFC 1928 §3)."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(REP_GENERAL_FAILURE, f"not SOCKS5 (version {buf[0]})")
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return Greeting(frozenset(buf[2:end])), end


def parse_userpass(buf: bytes) -> tuple[UserPass, int] | None:
    """`VER ULEN UNAME PLEN PASSWD` (RFC 1929 §2)."""
    if len(buf) < 2:
        return None
    if buf[0] != AUTH_VERSION:
        # Not RFC 1929: neither its VER STATUS reply nor a SOCKS5 reply would mean anything
        # to this client; the connection is just closed.
        raise Socks5Error(None, f"bad auth version {buf[0]}")
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return UserPass(bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])), end


def _decode_domain(raw: bytes) -> str:
    if not raw:
        raise Socks5Error(REP_HOST_UNREACHABLE, "empty domain name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Socks5Error(REP_HOST_UNREACHABLE, "domain name is not UTF-8") from None
    if _BAD_NAME.search(name):
        raise Socks5Error(REP_HOST_UNREACHABLE, f"invalid domain name {name!r}")
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            raise Socks5Error(REP_HOST_UNREACHABLE, f"invalid domain name {name!r}") from None
    return name


def parse_address(buf: bytes, offset: int) -> tuple[Address, int] | None:
    """`ATYP DST.ADDR DST.PORT` at `offset`; returns the address and the end offset."""
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == ATYP_IPV4:
        end = start + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[start:end])))
    elif atyp == ATYP_IPV6:
        end = start + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[start:end])))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < start + 1:
            return None
        end = start + 1 + buf[start]
        if len(buf) < end + 2:
            return None
        host = _decode_domain(bytes(buf[start + 1 : end]))
    else:
        raise Socks5Error(REP_ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp}")
    (port,) = struct.unpack_from("!H", buf, end)
    return Address(host, port), end + 2


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """`VER CMD RSV ATYP DST.ADDR DST.PORT` (RFC 1928 §4)."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(REP_GENERAL_FAILURE, f"bad request version {buf[0]}")
    command = buf[1]
    if command not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
        raise Socks5Error(REP_COMMAND_NOT_SUPPORTED, f"unsupported command {command}")
    parsed = parse_address(buf, 3)
    if parsed is None:
        return None
    target, end = parsed
    return Request(command, target), end


def parse_udp_packet(data: bytes) -> UdpPacket:
    """`RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA` (RFC 1928 §7); a whole datagram."""
    if len(data) < 4:
        raise Socks5Error(REP_GENERAL_FAILURE, "short UDP header")
    parsed = parse_address(data, 3)
    if parsed is None:
        raise Socks5Error(REP_GENERAL_FAILURE, "truncated UDP header")
    target, end = parsed
    return UdpPacket(data[2], target, bytes(data[end:]))


def encode_address(address: Address) -> bytes:
    ip = address.ip
    if ip is None:
        raw = address.host.encode("utf-8")
        if len(raw) > 255:
            raise ValueError("domain name longer than 255 bytes")
        head = bytes((ATYP_DOMAIN, len(raw))) + raw
    elif ip.version == 4:
        head = bytes((ATYP_IPV4,)) + ip.packed
    else:
        head = bytes((ATYP_IPV6,)) + ip.packed
    return head + struct.pack("!H", address.port)


_ZERO_ADDRESS = Address("0.0.0.0", 0)


def encode_reply(code: int, bind: Address | None = None) -> bytes:
    return bytes((VERSION, code, 0)) + encode_address(bind or _ZERO_ADDRESS)


def encode_udp_packet(source: Address, payload: bytes) -> bytes:
    return b"\x00\x00\x00" + encode_address(source) + payload


# --------------------------------------------------------------------------------------------
# the anyio shell

T = TypeVar("T")


async def _read(
    stream: anyio.abc.ByteStream, buf: bytearray, parse: Callable[[bytes], tuple[T, int] | None]
) -> T:
    while True:
        result = parse(bytes(buf))
        if result is not None:
            value, used = result
            del buf[:used]
            return value
        if len(buf) > MAX_HANDSHAKE_BYTES:
            raise Socks5Error(REP_GENERAL_FAILURE, "handshake too long")
        buf += await stream.receive(4096)


async def _negotiate(
    stream: anyio.abc.ByteStream, buf: bytearray, settings: ProxySettings, ctx: ConnContext
) -> Request | None:
    greeting = await _read(stream, buf, parse_greeting)
    if settings.users:
        if METHOD_USERPASS not in greeting.methods:
            await stream.send(bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
            logger.info("#%d SOCKS5 client offered no username/password method", ctx.id)
            return None
        await stream.send(bytes((VERSION, METHOD_USERPASS)))
        creds = await _read(stream, buf, parse_userpass)
        user = check_user(settings.users, creds.username, creds.password)
        if user is None:
            await stream.send(bytes((AUTH_VERSION, 0x01)))
            logger.info("#%d SOCKS5 authentication failed", ctx.id)
            return None
        ctx.user = user
        await stream.send(bytes((AUTH_VERSION, 0x00)))
    elif METHOD_NO_AUTH in greeting.methods:
        await stream.send(bytes((VERSION, METHOD_NO_AUTH)))
    elif METHOD_USERPASS in greeting.methods:
        # No users configured but the client insists on sending some: accept any.
        await stream.send(bytes((VERSION, METHOD_USERPASS)))
        await _read(stream, buf, parse_userpass)
        await stream.send(bytes((AUTH_VERSION, 0x00)))
    else:
        await stream.send(bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
        return None
    return await _read(stream, buf, parse_request)


async def handle_socks5(
    stream: anyio.abc.ByteStream,
    initial: bytes,
    ctx: ConnContext,
    dispatcher: Dispatcher,
    settings: ProxySettings,
) -> None:
    """Serve one SOCKS5 client connection whose first bytes are `initial`."""
    buf = bytearray(initial)
    try:
        with anyio.fail_after(settings.handshake_timeout):
            request = await _negotiate(stream, buf, settings, ctx)
    except Socks5Error as exc:
        logger.debug("#%d SOCKS5: %s", ctx.id, exc)
        if exc.reply is not None:
            await stream.send(encode_reply(exc.reply))
        return
    except TimeoutError:
        logger.debug("#%d SOCKS5 handshake timed out", ctx.id)
        return
    if request is None:
        return
    if request.command == CMD_CONNECT:
        await _connect(stream, bytes(buf), request.target, ctx, dispatcher)
    elif settings.udp:
        await _udp_associate(stream, ctx, dispatcher)
    else:
        await stream.send(encode_reply(REP_COMMAND_NOT_SUPPORTED))


async def _connect(
    stream: anyio.abc.ByteStream,
    leftover: bytes,
    target: Address,
    ctx: ConnContext,
    dispatcher: Dispatcher,
) -> None:
    try:
        remote = await dispatcher.connect_tcp(ctx, target)
    except OutboundError as exc:
        code = reply_for_error(exc)
        log = logger.info if isinstance(exc, Blocked) else logger.debug
        log("#%d SOCKS5 CONNECT %s via %s failed: %s", ctx.id, target, ctx.outbound_tag, exc)
        await stream.send(encode_reply(code))
        return
    async with remote:
        await stream.send(encode_reply(REP_SUCCEEDED))
        if leftover:
            await remote.send(leftover)
            ctx.bytes_up += len(leftover)
        await relay_streams(stream, remote, ctx)


@dataclass(slots=True)
class UdpAssociationStats:
    dropped_frag: int = 0
    dropped_foreign: int = 0
    dropped_malformed: int = 0
    dropped_blocked: int = 0
    sent: int = 0
    received: int = 0


class _UdpAssociation:
    """The relay of one UDP ASSOCIATE: client datagrams out, replies back (RFC 1928 §7)."""

    def __init__(
        self,
        udp: anyio.abc.UDPSocket,
        control_peer: Address | None,
        ctx: ConnContext,
        dispatcher: Dispatcher,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        self.udp = udp
        self.control_peer = control_peer
        self.ctx = ctx
        self.dispatcher = dispatcher
        self.tg = tg
        self.client: tuple[str, int] | None = None
        self.sessions: dict[str, UdpOutboundSession | None] = {}
        self.stats = UdpAssociationStats()

    async def from_client(self) -> None:
        async for data, (host, port) in self.udp:
            peer = Address.from_sockaddr((host, port))
            if self.client is None:
                # The first sender becomes the client; it must be the control connection's host.
                if self.control_peer is not None and peer.host != self.control_peer.host:
                    self.stats.dropped_foreign += 1
                    continue
                self.client = (host, port)
            elif (host, port) != self.client:
                self.stats.dropped_foreign += 1
                continue
            try:
                packet = parse_udp_packet(data)
            except Socks5Error:
                self.stats.dropped_malformed += 1
                continue
            if packet.frag != 0:  # fragmentation is optional (RFC 1928 §7); we drop
                self.stats.dropped_frag += 1
                continue
            session = await self._session_for(packet.target)
            if session is None:
                self.stats.dropped_blocked += 1
                continue
            try:
                await session.send_to(packet.target, packet.payload)
                self.ctx.bytes_up += len(packet.payload)
                self.stats.sent += 1
            except OutboundError as exc:
                logger.debug("#%d UDP to %s: %s", self.ctx.id, packet.target, exc)
                self.stats.dropped_blocked += 1

    async def _session_for(self, target: Address) -> UdpOutboundSession | None:
        outbound = self.dispatcher.route(self.ctx, target, "udp")
        if outbound.tag in self.sessions:
            return self.sessions[outbound.tag]
        session: UdpOutboundSession | None
        try:
            session = await outbound.open_udp(self.ctx)
        except OutboundError as exc:
            logger.debug("#%d UDP via %s refused: %s", self.ctx.id, outbound.tag, exc)
            session = None
        self.sessions[outbound.tag] = session
        if session is not None:
            self.tg.start_soon(self.to_client, session)
        return session

    async def to_client(self, session: UdpOutboundSession) -> None:
        try:
            while True:
                source, data = await session.receive()
                if self.client is None:
                    continue
                self.ctx.bytes_down += len(data)
                self.stats.received += 1
                await self.udp.sendto(encode_udp_packet(source, data), *self.client)
        except anyio.EndOfStream:
            return
        except EXPECTED_STREAM_ERRORS as exc:
            logger.debug("#%d UDP reply path: %r", self.ctx.id, exc)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for session in self.sessions.values():
                if session is not None:
                    await session.aclose()


async def _udp_associate(
    stream: anyio.abc.ByteStream, ctx: ConnContext, dispatcher: Dispatcher
) -> None:
    ctx.network = "udp"
    local = stream.extra(SocketAttribute.local_address)  # noqa: S610 (anyio, not Django)
    local_ip = Address.from_sockaddr(local).host
    peer: Address | None = None
    try:
        peer = Address.from_sockaddr(stream.extra(SocketAttribute.remote_address))  # noqa: S610
    except (anyio.TypedAttributeLookupError, ValueError):
        peer = None
    try:
        udp = await anyio.create_udp_socket(local_host=local_ip, local_port=0)
    except OSError as exc:
        logger.warning("#%d cannot open a UDP relay socket: %s", ctx.id, exc)
        await stream.send(encode_reply(REP_GENERAL_FAILURE))
        return
    async with udp:
        bound = Address.from_sockaddr(udp.extra(SocketAttribute.local_address))  # noqa: S610
        await stream.send(encode_reply(REP_SUCCEEDED, bound))
        async with anyio.create_task_group() as tg:
            association = _UdpAssociation(udp, peer, ctx, dispatcher, tg)
            try:
                tg.start_soon(association.from_client)
                # The association lives as long as the control connection (RFC 1928 §7).
                try:
                    while await stream.receive(1024):
                        pass
                except EXPECTED_STREAM_ERRORS:
                    pass
                tg.cancel_scope.cancel()
            finally:
                await association.aclose()
        logger.debug("#%d UDP association ended: %s", ctx.id, association.stats)
