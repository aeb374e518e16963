"""The Inbound interface and what the proxy inbounds share (settings, user check)."""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from ostp_client.connections import Dispatcher
from ostp_client.errors import OstpClientError

__all__ = ["Inbound", "InboundReport", "ProxySettings", "StartError", "check_user", "os_reason"]


class StartError(OstpClientError, OSError):
    """A part of the daemon could not start: an inbound's listener (a busy port), the TUN
    device, the control socket. The message is one line that names the part and where, e.g.
    ``inbound "proxy-in" cannot listen on 127.0.0.1:1088: address already in use``; the
    command line prints it as it is, without a traceback."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def os_reason(exc: OSError) -> str:
    """An OS error as the end of a sentence: ``address already in use``, ``permission denied
    (/dev/net/tun)``."""
    if not (isinstance(exc.strerror, str) and exc.strerror):
        return str(exc)
    text = (
        exc.strerror[:1].lower() + exc.strerror[1:] if exc.strerror[1:2].islower() else exc.strerror
    )
    return f"{text} ({exc.filename})" if exc.filename else text


class Inbound(ABC):
    """Accepts local connections and hands them to the `Dispatcher`. Owned by the daemon."""

    type: str = "abstract"

    def __init__(self, tag: str, dispatcher: Dispatcher) -> None:
        self.tag = tag
        self.dispatcher = dispatcher

    @abstractmethod
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; call `task_status.started()` once accepting."""

    def status(self) -> InboundReport:
        """What the inbound says about itself for the control socket and the metrics."""
        return InboundReport(tag=self.tag, type=self.type)


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundReport:
    """What an inbound says about itself (`Inbound.status()`); the TUN inbound says more
    (`TunReport`)."""

    tag: str
    type: str
    listen: tuple[str, ...] = ()
    """Addresses it accepts on (`host:port`)."""
    accepted: int | None = None
    """Connections accepted since it started; None where it does not count them."""
    counters: Mapping[str, int] = field(default_factory=dict)
    """Further totals by name (the metrics export the known ones): `tcp_refused`,
    `udp_dropped`, `dns_queries`, `dns_fake_answers`, `dns_dropped`, `udp_flows`."""


@dataclass(slots=True)
class ProxySettings:
    users: Mapping[str, bytes] = field(default_factory=dict)
    """username → password; empty means no authentication."""
    udp: bool = True
    """Accept SOCKS5 UDP ASSOCIATE."""
    handshake_timeout: float = 30.0
    """Seconds for a client to finish its SOCKS5 negotiation / send an HTTP request head."""


def check_user(users: Mapping[str, bytes], username: bytes, password: bytes) -> str | None:
    """The username when the pair is valid (constant-time password compare), else None."""
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        return None
    expected = users.get(name)
    if expected is None:
        hmac.compare_digest(password, password)  # same work for unknown users
        return None
    return name if hmac.compare_digest(expected, password) else None
