"""What the control socket, the metrics endpoint and systemd notify read from a running daemon.

They are given a `RunningDaemon`, an interface, rather than the `Daemon` class: the daemon
starts them, so they must not import it (that was an import cycle). `ostp_client.daemon.Daemon`
is the one implementation; mypy checks that it fits where the daemon passes itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import anyio

    from ostp_client.config import ClientConfig
    from ostp_client.connections import ConnectionRegistry
    from ostp_client.inbounds import Inbound
    from ostp_client.outbounds import Outbound
    from ostp_client.outbounds.group import GroupOutbound, HealthBook
    from ostp_client.reload import ReloadOutcome
    from ostp_client.router import Router

__all__ = ["RunningDaemon"]


class RunningDaemon(Protocol):
    """A running client daemon as its observers and the control socket see it."""

    @property
    def config(self) -> ClientConfig: ...

    @property
    def registry(self) -> ConnectionRegistry:
        """The live connections."""
        ...

    @property
    def router(self) -> Router:
        """The routing rules and their hit counters."""
        ...

    @property
    def outbounds(self) -> dict[str, Outbound]: ...

    @property
    def inbounds(self) -> dict[str, Inbound]: ...

    @property
    def health(self) -> HealthBook: ...

    @property
    def started(self) -> anyio.Event:
        """Set once every part has started."""
        ...

    def groups(self) -> dict[str, GroupOutbound]: ...

    async def reload(self, new: ClientConfig) -> ReloadOutcome:
        """Apply a validated config; raises `ReloadError` (then nothing changed)."""
        ...
