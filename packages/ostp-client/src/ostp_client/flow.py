"""The Outbound interface: where an inbound's connection goes after routing.

An outbound opens TCP-like byte streams (`connect_tcp`) and UDP sessions (`open_udp`) to a
target `Address`. Failures are raised as one `OutboundError` subclass each, which the inbounds
map to SOCKS5 reply codes and HTTP statuses. Long-lived outbounds (ostp) do their background
work in `run()`, which the daemon starts in its task group before any inbound accepts.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from ostp_client.errors import OstpClientError
from ostp_proto.address import format_host_port, parse_host_port, sockaddr_host

__all__ = [
    "Address",
    "Blocked",
    "ConnContext",
    "ConnectTimeout",
    "ConnectionRefused",
    "GeneralFailure",
    "HostUnreachable",
    "Network",
    "NetworkUnreachable",
    "Outbound",
    "OutboundError",
    "OutboundReport",
    "UdpOutboundSession",
]

logger = logging.getLogger(__name__)

Network = Literal["tcp", "udp"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Address:
    """A destination: `host` is a domain name or IP address text (no brackets), plus a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if not self.host:
            raise ValueError("empty host")

    @property
    def ip(self) -> IPAddress | None:
        """The host as an IP address, or None for a domain name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def is_domain(self) -> bool:
        return self.ip is None

    @property
    def domain(self) -> str | None:
        """The lower-cased domain name without a trailing dot, or None for an IP address."""
        if self.ip is not None:
            return None
        return self.host.rstrip(".").lower()

    def __str__(self) -> str:
        """Socket-address text: `1.2.3.4:443`, `example.com:443`, `[2001:db8::1]:443` (§8)."""
        return format_host_port(self.host, self.port)

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Address:
        """Parse `host:port` / `[v6]:port` (or a bare host with `default_port`)."""
        host, port = parse_host_port(text, default_port)
        return cls(host, port)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[Any, ...] | str) -> Address:
        """From a socket address tuple; IPv4-mapped IPv6 addresses become IPv4 text."""
        if isinstance(sockaddr, str):
            raise ValueError(f"not an IP socket address: {sockaddr!r}")
        return cls(sockaddr_host(sockaddr[0]), int(sockaddr[1]))


@dataclass(slots=True, eq=False)
class ConnContext:
    """One live connection as the daemon's registry and the dashboard see it.

    Created by an inbound when it accepts; routing fills in `destination`, `rule_index` and
    `outbound_tag`; pumps add to `bytes_up`/`bytes_down`.
    """

    id: int
    inbound_tag: str
    network: Network = "tcp"
    source: Address | None = None
    destination: Address | None = None
    rule_index: int | None = None
    """Index of the routing rule that matched, None when `default_outbound` applied."""
    outbound_tag: str | None = None
    via: tuple[str, ...] = ()
    """The groups a connection went through and the member that carries it, e.g.
    `("auto", "proxy-b")`; empty when `outbound_tag` is not a group."""
    user: str | None = None
    bytes_up: int = 0
    """Bytes from the local client towards the destination."""
    bytes_down: int = 0
    started_at: float = field(default_factory=time.time)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "inbound": self.inbound_tag,
            "network": self.network,
            "source": str(self.source) if self.source else None,
            "destination": str(self.destination) if self.destination else None,
            "rule": self.rule_index,
            "outbound": self.outbound_tag,
            "via": list(self.via),
            "user": self.user,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "started_at": self.started_at,
        }


class OutboundError(OstpClientError):
    """A connection could not be made through an outbound. The message is for logs."""


class ConnectionRefused(OutboundError):
    """The destination refused (TCP RST)."""


class HostUnreachable(OutboundError):
    """No route to the host, or its name did not resolve."""


class NetworkUnreachable(OutboundError):
    """No route to the network."""


class ConnectTimeout(OutboundError):
    """The connection was not established in time (SOCKS5 0x06 "TTL expired", HTTP 504)."""


class Blocked(OutboundError):
    """Refused by policy (the `block` outbound): SOCKS5 0x02, HTTP 403."""


class GeneralFailure(OutboundError):
    """Anything else (tunnel down, protocol error)."""


class UdpOutboundSession(ABC):
    """A UDP association through an outbound: datagrams to and from many targets."""

    @abstractmethod
    async def send_to(self, target: Address, data: bytes) -> None:
        """Send one datagram. May drop it silently (UDP); raises OutboundError when closed."""

    @abstractmethod
    async def receive(self) -> tuple[Address, bytes]:
        """Next datagram and its source; raises anyio.EndOfStream when the session ended."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the session; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundReport:
    """What an outbound says about itself (`Outbound.status()`). Outbounds with more to say
    return a subclass (`OstpReport`, `GroupReport`); the control server and the metrics read
    them by type and add what only the daemon knows (rates, live connections, checks)."""

    tag: str
    type: str
    state: str = "ready"
    """`ready` for outbounds without sessions; `idle`, `connecting`, `connected` for ostp;
    `ready` or `down` for groups."""


class Outbound(ABC):
    """Where routed connections go. One instance per configured outbound, owned by the daemon.

    Implementations: `connect_tcp` returns a connected `anyio.abc.ByteStream` that supports
    `send_eof()` (half-close) and applies backpressure in `send()`; errors are raised as
    `OutboundError` subclasses only (never raw OSError). `connect_tcp`/`open_udp` may be called
    concurrently from many tasks.
    """

    type: str = "abstract"

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._state_listeners: list[Callable[[Outbound], None]] = []

    # -- state changes (groups follow their members) -----------------------------------------

    def add_state_listener(self, callback: Callable[[Outbound], None]) -> None:
        """Call `callback(self)` whenever the outbound's `state` changes (ostp sessions)."""
        if callback not in self._state_listeners:
            self._state_listeners.append(callback)

    def remove_state_listener(self, callback: Callable[[Outbound], None]) -> None:
        if callback in self._state_listeners:
            self._state_listeners.remove(callback)

    def notify_state(self) -> None:
        for callback in list(self._state_listeners):
            try:
                callback(self)
            except Exception:  # a listener's bug must not break the session loop
                logger.exception("state listener of outbound %s failed", self.tag)

    def last_heard(self) -> float | None:
        """Monotonic time of the last datagram from the far end (a server), for outbounds
        that have one; None otherwise. Groups use it to notice a dead server within a second
        instead of waiting for an idle timeout."""
        return None

    def round_trip(self) -> float | None:
        """Seconds, the outbound's current round-trip estimate to its server, if it has one."""
        return None

    @abstractmethod
    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        """Open a stream to `target` for connection `ctx`."""

    @abstractmethod
    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        """Open a UDP session for connection `ctx` (a SOCKS5 UDP ASSOCIATE)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background work for the daemon's lifetime; call `task_status.started()` when ready.

        The default has none and returns at once. The daemon cancels this task at shutdown.
        """
        task_status.started()

    def status(self) -> OutboundReport:
        """What the outbound says about itself for the control socket, metrics and sd_notify."""
        return OutboundReport(tag=self.tag, type=self.type)
