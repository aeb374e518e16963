"""Live connections: the registry, the dispatcher inbounds go through, and the byte pump.

Every inbound (local proxy, later TUN) gets one `Dispatcher`. It routes a destination with the
`Router`, records the decision on the connection's `ConnContext` (the dashboard shows why a
connection took its route) and opens the stream through the chosen outbound.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import SocketAttribute

from ostp_client.flow import Address, ConnContext, Network, Outbound
from ostp_client.process_info import ProcessInfo
from ostp_client.router import ProcessLookup, Router

__all__ = [
    "EXPECTED_STREAM_ERRORS",
    "READ_SIZE",
    "ConnectionRegistry",
    "Dispatcher",
    "is_connection_noise",
    "relay_streams",
    "reset_on_close",
]

logger = logging.getLogger(__name__)

READ_SIZE = 65536
"""Bytes per read in the pump; the send side waits for the peer (backpressure)."""

EXPECTED_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionError,
    OSError,
)
"""Connection noise (reset, broken pipe, EOF): logged at debug level only."""


def is_connection_noise(exc: BaseException) -> bool:
    """True for reset/broken pipe/EOF, also when wrapped in (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_connection_noise(sub) for sub in exc.exceptions)
    return isinstance(exc, EXPECTED_STREAM_ERRORS)


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_on_close(stream: object) -> None:
    """Make closing ``stream`` a reset (RST), not an orderly FIN.

    For a transfer that did not end cleanly: the peer must see an error, never what looks like
    the end of the data (a close-delimited HTTP body would pass for complete). A TCP socket
    gets ``SO_LINGER`` (on, 0 s), so that its close sends RST and drops unsent data. Streams
    without a socket (an ostp stream) have no orderly close to avoid: their close is a reset
    already (relay Close, spec §8).
    """
    if not isinstance(stream, anyio.TypedAttributeProvider):
        return
    try:
        sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 (anyio, not Django)
    except anyio.TypedAttributeLookupError:
        return
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with suppress(OSError):  # closed or reset already
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class ConnectionRegistry:
    """Live connections by id (ids start at 1 and are never reused within a run)."""

    def __init__(self) -> None:
        self._next_id = 1
        self.live: dict[int, ConnContext] = {}
        self.closed_total = 0
        self.closed_bytes_up = 0
        self.closed_bytes_down = 0
        self.closed_by_outbound: dict[str | None, tuple[int, int]] = {}
        """Bytes (up, down) of the ended connections per outbound tag (for the metrics)."""
        self._cancel_scopes: dict[int, anyio.CancelScope] = {}

    def open(
        self, inbound_tag: str, network: Network = "tcp", source: Address | None = None
    ) -> ConnContext:
        ctx = ConnContext(self._next_id, inbound_tag, network, source)
        self._next_id += 1
        self.live[ctx.id] = ctx
        return ctx

    def cancel_scope(self, ctx: ConnContext) -> anyio.CancelScope:
        """The scope the connection's handler runs in; `cancel(id)` cancels it."""
        return self._cancel_scopes.setdefault(ctx.id, anyio.CancelScope())

    def cancel(self, conn_id: int) -> bool:
        """Close a live connection by cancelling its handler; False when it is not live."""
        if conn_id not in self.live:
            return False
        self.cancel_scope(self.live[conn_id]).cancel()
        return True

    def close(self, ctx: ConnContext) -> None:
        self._cancel_scopes.pop(ctx.id, None)
        if self.live.pop(ctx.id, None) is not None:
            self.closed_total += 1
            self.closed_bytes_up += ctx.bytes_up
            self.closed_bytes_down += ctx.bytes_down
            up, down = self.closed_by_outbound.get(ctx.outbound_tag, (0, 0))
            self.closed_by_outbound[ctx.outbound_tag] = (up + ctx.bytes_up, down + ctx.bytes_down)

    @contextmanager
    def track(
        self, inbound_tag: str, network: Network = "tcp", source: Address | None = None
    ) -> Iterator[ConnContext]:
        ctx = self.open(inbound_tag, network, source)
        try:
            with self.cancel_scope(ctx):
                yield ctx
        finally:
            self.close(ctx)

    def snapshot(self) -> list[dict[str, Any]]:
        return [ctx.snapshot() for ctx in self.live.values()]


class Dispatcher:
    """Routes destinations to outbounds for the inbounds."""

    def __init__(
        self, router: Router, outbounds: Mapping[str, Outbound], registry: ConnectionRegistry
    ) -> None:
        self.router = router
        self.outbounds = outbounds
        self.registry = registry

    def route(
        self,
        ctx: ConnContext,
        target: Address,
        network: Network | None = None,
        process_lookup: ProcessLookup | None = None,
    ) -> Outbound:
        """Choose the outbound for `target` and record the decision on `ctx`."""
        decision = self.router.route(
            target, network or ctx.network, ctx.inbound_tag, ctx.source, process_lookup
        )
        ctx.destination = target
        ctx.via = ()
        ctx.rule_index = decision.rule_index
        ctx.outbound_tag = decision.outbound_tag
        if logger.isEnabledFor(logging.DEBUG):
            why = "default" if decision.rule_index is None else f"rule {decision.rule_index}"
            logger.debug(
                "#%d %s %s -> %s via %s (%s)",
                ctx.id,
                network or ctx.network,
                ctx.source,
                target,
                decision.outbound_tag,
                why,
            )
        return self.outbounds[decision.outbound_tag]

    async def connect_tcp(self, ctx: ConnContext, target: Address) -> anyio.abc.ByteStream:
        """Route and connect; raises `OutboundError` subclasses."""
        lookup = None
        router = self.router
        if router.uses_process and ctx.source is not None and router.process_lookup is not None:
            # the owner of the local socket, looked up off the event loop (netlink, /proc)
            found = await anyio.to_thread.run_sync(router.process_lookup, ctx.source, "tcp")

            def lookup(source: Address, network: Network) -> ProcessInfo | None:
                return found

        return await self.route(ctx, target, "tcp", lookup).connect_tcp(target, ctx)


async def _pump(
    src: anyio.abc.ByteReceiveStream, dst: anyio.abc.ByteSendStream, ctx: ConnContext, up: bool
) -> bool:
    """Copy until EOF, then half-close `dst`. False when either side broke."""
    try:
        while True:
            try:
                data = await src.receive(READ_SIZE)
            except anyio.EndOfStream:
                break
            await dst.send(data)
            if up:
                ctx.bytes_up += len(data)
            else:
                ctx.bytes_down += len(data)
        if isinstance(dst, anyio.abc.ByteStream):
            await dst.send_eof()
    except EXPECTED_STREAM_ERRORS as exc:
        logger.debug("#%d %s: %r", ctx.id, "upload" if up else "download", exc)
        return False
    return True


async def relay_streams(
    client: anyio.abc.ByteStream, remote: anyio.abc.ByteStream, ctx: ConnContext
) -> bool:
    """Pump both directions until both ended (half-close aware) or one side broke.

    True when both directions ended with an orderly EOF. Otherwise (one side reset or broke:
    a tunnel session lost, data lost, the remote reset; or the relay was cancelled, e.g. at
    shutdown) both streams are marked to reset when they are closed (`reset_on_close`): the
    application sees a reset, never a clean end of a truncated transfer, and the remote end
    is not told that the upload was complete.
    """
    done = 0
    try:
        async with anyio.create_task_group() as tg:

            async def download() -> None:
                nonlocal done
                if await _pump(remote, client, ctx, up=False):
                    done += 1
                else:
                    tg.cancel_scope.cancel()

            tg.start_soon(download)
            if await _pump(client, remote, ctx, up=True):
                done += 1
            else:
                tg.cancel_scope.cancel()
    finally:
        if done != 2:
            reset_on_close(client)
            reset_on_close(remote)
    return done == 2
