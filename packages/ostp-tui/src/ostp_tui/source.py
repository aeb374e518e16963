"""Where the dashboard gets its data: a connection to the daemon's control socket.

The app only needs the `DaemonLink` protocol below; `ControlClient` from
`ostp_client.control.client` satisfies it, and tests pass a fake with deterministic data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ostp_client.control.client import ControlClient
from ostp_client.control.protocol import ActionResult, Event, Hello, SubscribeResult

__all__ = ["Connector", "DaemonLink", "control_connector"]


class DaemonLink(Protocol):
    """What the dashboard uses of a control connection."""

    hello: Hello

    async def subscribe(self, topic: str, **params: Any) -> SubscribeResult: ...

    def events(self) -> AsyncIterator[Event]: ...

    async def reconnect(self, outbound: str) -> ActionResult: ...

    async def select(self, group: str, outbound: str) -> ActionResult: ...

    async def close_connection(self, conn_id: int) -> ActionResult: ...

    async def aclose(self) -> None: ...


Connector = Callable[[], Awaitable[DaemonLink]]
"""Opens a new link; raises ConnectionError (or OSError) when no daemon answers."""


def control_connector(path: str) -> Connector:
    async def connect() -> DaemonLink:
        return await ControlClient.connect(path)

    return connect
