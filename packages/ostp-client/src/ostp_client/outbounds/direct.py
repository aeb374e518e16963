"""The `direct` outbound: connects from this machine.

TCP goes through `anyio.connect_tcp`, which does RFC 8305 happy eyeballs when given a name with
addresses of both families; when the sockets must carry a routing mark (the outbound's
`routing_mark`, else the one a TUN inbound with `auto_route` set: see
`ostp_client.net.bypass`), through `ostp_client.outbounds.happy_eyeballs`, which sets it before
`connect()` and does the same racing. With a mark, names are resolved by
`ostp_client.dns.resolver.StubResolver`, whose DNS queries carry the mark too (the system
resolver's would enter the TUN, and with ``fake_ip`` come back fake). UDP uses one unconnected
socket per association (dual-stack IPv6 when the system has IPv6, IPv4 otherwise), marked the
same way. OS errors are mapped to `OutboundError`s here, in one place.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ostp_client.config import DirectOutboundConfig
from ostp_client.dns.resolver import ResolveError, StubResolver
from ostp_client.flow import (
    Address,
    ConnContext,
    ConnectionRefused,
    ConnectTimeout,
    GeneralFailure,
    HostUnreachable,
    NetworkUnreachable,
    Outbound,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.net.bypass import apply_bypass, inside_tunnel, routing_mark
from ostp_client.outbounds import happy_eyeballs

__all__ = ["DirectOutbound", "DirectUdpSession", "map_os_error"]

logger = logging.getLogger(__name__)

_ERRNO_MAP: dict[int, type[OutboundError]] = {
    errno.ECONNREFUSED: ConnectionRefused,
    errno.EHOSTUNREACH: HostUnreachable,
    errno.EHOSTDOWN: HostUnreachable,
    errno.EADDRNOTAVAIL: HostUnreachable,
    errno.ENETUNREACH: NetworkUnreachable,
    errno.ENETDOWN: NetworkUnreachable,
    errno.ETIMEDOUT: ConnectTimeout,
}
# Which error wins when happy eyeballs tried several addresses.
_PRIORITY: tuple[type[OutboundError], ...] = (
    ConnectionRefused,
    ConnectTimeout,
    HostUnreachable,
    NetworkUnreachable,
    GeneralFailure,
)


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_errors(sub)]
    if exc.__cause__ is not None and str(exc) == "All connection attempts failed":
        return _leaf_errors(exc.__cause__)  # anyio.connect_tcp wraps the per-address errors
    return [exc]


def map_os_error(exc: BaseException, target: object) -> OutboundError:
    """Turn an OSError (or anyio's "All connection attempts failed") into an OutboundError."""
    kinds: list[type[OutboundError]] = []
    for leaf in _leaf_errors(exc):
        if isinstance(leaf, socket.gaierror):
            kinds.append(HostUnreachable)
        elif isinstance(leaf, TimeoutError):
            kinds.append(ConnectTimeout)
        elif isinstance(leaf, OSError) and leaf.errno in _ERRNO_MAP:
            kinds.append(_ERRNO_MAP[leaf.errno])
        else:
            kinds.append(GeneralFailure)
    kind = min(kinds, key=_PRIORITY.index) if kinds else GeneralFailure
    return kind(f"{target}: {exc}")


class DirectOutbound(Outbound):
    type = "direct"

    def __init__(
        self,
        tag: str = "direct",
        *,
        connect_timeout: float = 10.0,
        bind_address: str | None = None,
        override_address: str | None = None,
        override_port: int | None = None,
        routing_mark: int | None = None,
    ) -> None:
        super().__init__(tag)
        self.connect_timeout = connect_timeout
        self.bind_address = bind_address
        self.override_address = override_address
        self.override_port = override_port
        self.routing_mark = routing_mark
        """SO_MARK for this outbound's sockets; None: the process-wide mark (if any)."""
        self.resolver = StubResolver()
        """Resolves names while a mark is in effect (its queries are marked too)."""

    @classmethod
    def from_config(cls, config: DirectOutboundConfig) -> DirectOutbound:
        return cls(
            config.tag,
            connect_timeout=config.connect_timeout,
            bind_address=config.bind_address,
            override_address=config.override_address,
            override_port=config.override_port,
            routing_mark=config.routing_mark,
        )

    def _mark(self) -> int | None:
        return self.routing_mark if self.routing_mark is not None else routing_mark()

    def _effective(self, target: Address) -> Address:
        if self.override_address is None and self.override_port is None:
            return target
        return Address(self.override_address or target.host, self.override_port or target.port)

    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        dest = self._effective(target)
        _refuse_tunnel_address(dest.host, dest)
        mark = self._mark()
        try:
            with anyio.fail_after(self.connect_timeout):
                if mark is None:
                    stream = await anyio.connect_tcp(
                        dest.host, dest.port, local_host=self.bind_address
                    )
                else:
                    stream = await self._connect_marked(dest, mark)
        except ResolveError as exc:
            raise HostUnreachable(str(exc)) from None
        except TimeoutError:
            raise ConnectTimeout(f"{dest}: no answer in {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise map_os_error(exc, dest) from None
        try:
            sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 (anyio, not Django)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - the socket died between connect and here
            pass
        return stream

    async def _connect_marked(self, dest: Address, mark: int) -> anyio.abc.SocketStream:
        """A name is resolved by the stub resolver first; its addresses are then raced."""
        if dest.ip is not None:
            return await happy_eyeballs.connect_tcp(
                dest.host, dest.port, local_host=self.bind_address, mark=mark
            )
        family = 0
        if self.bind_address is not None:
            family = socket.AF_INET6 if ":" in self.bind_address else socket.AF_INET
        addresses = await self.resolver.resolve(dest.host, family, mark)
        for address in addresses:
            _refuse_tunnel_address(address, dest)
        # raced RFC 8305 style, as for names the system resolves
        return await happy_eyeballs.connect_tcp(
            dest.host, dest.port, local_host=self.bind_address, mark=mark, addresses=addresses
        )

    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        try:
            mark = self._mark()
            return await DirectUdpSession.open(
                self.bind_address,
                self._effective,
                mark,
                resolver=self.resolver if mark is not None else None,
            )
        except OSError as exc:
            raise map_os_error(exc, "UDP socket") from None


_Rewrite = Callable[[Address], Address]


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


class DirectUdpSession(UdpOutboundSession):
    """One unconnected UDP socket; domain targets are resolved (and cached) per session."""

    _CACHE_SIZE = 64

    def __init__(
        self,
        sock: anyio.abc.UDPSocket,
        family: int,
        rewrite: _Rewrite | None = None,
        resolver: StubResolver | None = None,
        mark: int | None = None,
    ) -> None:
        self._sock = sock
        self._family = family
        self._rewrite = rewrite
        self._resolver = resolver
        self._mark = mark
        self._resolved: OrderedDict[str, str] = OrderedDict()
        self.send_errors = 0

    @classmethod
    async def open(
        cls,
        bind_address: str | None,
        rewrite: _Rewrite | None = None,
        mark: int | None = None,
        *,
        resolver: StubResolver | None = None,
    ) -> DirectUdpSession:
        """A new session; ``mark`` (else the process-wide routing mark) goes on its socket.

        With ``resolver``, names are resolved by it (its queries marked the same way) instead of
        the system resolver."""
        if bind_address is not None:
            family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
            host = bind_address
        elif _has_ipv6():
            family, host = socket.AF_INET6, "::"
        else:
            family, host = socket.AF_INET, "0.0.0.0"
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and bind_address is None:
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            apply_bypass(raw, mark)
            raw.bind((host, 0))
            raw.setblocking(False)
            sock = await anyio.abc.UDPSocket.from_socket(raw)
        except BaseException:
            raw.close()
            raise
        return cls(sock, family, rewrite, resolver, mark)

    async def _resolve(self, host: str) -> str:
        cached = self._resolved.get(host)
        if cached is not None:
            self._resolved.move_to_end(host)
            return cached
        family = 0 if self._family == socket.AF_INET6 else socket.AF_INET
        if self._resolver is not None:
            try:
                address = (await self._resolver.resolve(host, family, self._mark))[0]
            except ResolveError as exc:
                raise HostUnreachable(str(exc)) from None
            return self._remember(host, address)
        try:
            infos = await anyio.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise HostUnreachable(f"{host}: {exc}") from None
        if not infos:
            raise HostUnreachable(f"{host}: no address")
        return self._remember(host, str(infos[0][4][0]))

    def _remember(self, host: str, address: str) -> str:
        self._resolved[host] = address
        if len(self._resolved) > self._CACHE_SIZE:
            self._resolved.popitem(last=False)
        return address

    async def send_to(self, target: Address, data: bytes) -> None:
        if self._rewrite is not None:
            target = self._rewrite(target)
        host = target.host if target.ip is not None else await self._resolve(target.host)
        if self._family == socket.AF_INET6 and ":" not in host:
            host = "::ffff:" + host
        try:
            await self._sock.sendto(data, host, target.port)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise GeneralFailure(f"UDP session closed: {exc}") from None
        except OSError as exc:
            self.send_errors += 1  # ICMP errors and unreachable targets: UDP drops
            logger.debug("direct UDP send to %s failed: %s", target, exc)

    async def receive(self) -> tuple[Address, bytes]:
        while True:
            try:
                data, (host, port) = await self._sock.receive()
            except anyio.ClosedResourceError:
                raise anyio.EndOfStream from None
            except OSError as exc:
                logger.debug("direct UDP receive error: %s", exc)  # e.g. ICMP port unreachable
                continue
            return Address.from_sockaddr((host, port)), data

    async def aclose(self) -> None:
        await self._sock.aclose()


def _refuse_tunnel_address(host: str, dest: Address) -> None:
    """A fake-IP address exists only inside the TUN: connecting to it from here would loop."""
    if inside_tunnel(host):
        raise HostUnreachable(f"{dest}: {host} is one of the TUN's fake addresses (would loop)")
