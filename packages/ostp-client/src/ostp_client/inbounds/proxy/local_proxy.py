"""The `local_proxy` inbound: one TCP port, SOCKS5 and HTTP (first byte 0x05 → SOCKS5, §10.4)."""

from __future__ import annotations

import logging

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus

from ostp_client.config import LocalProxyInboundConfig
from ostp_client.connections import READ_SIZE, Dispatcher, is_connection_noise, reset_on_close
from ostp_client.flow import Address, ConnContext
from ostp_client.inbounds.base import (
    Inbound,
    InboundReport,
    ProxySettings,
    StartError,
    os_reason,
)
from ostp_client.inbounds.proxy.http import handle_http
from ostp_client.inbounds.proxy.socks5 import VERSION as SOCKS5_VERSION
from ostp_client.inbounds.proxy.socks5 import handle_socks5
from ostp_client.serving import serve_listener

__all__ = ["LocalProxyInbound"]

logger = logging.getLogger(__name__)


class LocalProxyInbound(Inbound):
    type = "local_proxy"

    def __init__(self, config: LocalProxyInboundConfig, dispatcher: Dispatcher) -> None:
        super().__init__(config.tag, dispatcher)
        self.config = config
        self.settings = ProxySettings(
            users={u.username: u.password.get_secret_value().encode() for u in config.users},
            udp=config.udp,
            handshake_timeout=config.handshake_timeout,
        )
        self.addresses: list[Address] = []
        """Where it listens, once started (useful with port 0)."""
        self.accepted = 0
        self.failed_handlers = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            listener = await anyio.create_tcp_listener(
                local_host=self.config.listen, local_port=self.config.port
            )
        except OSError as exc:
            address = Address(self.config.listen, self.config.port)
            raise StartError(
                f'inbound "{self.tag}" cannot listen on {address}: {os_reason(exc)}', exc.errno
            ) from exc
        async with listener, anyio.create_task_group() as tg:
            self.addresses = [
                Address.from_sockaddr(sub.extra(SocketAttribute.local_address))  # noqa: S610
                for sub in listener.listeners
            ]
            where = ", ".join(str(a) for a in self.addresses)
            auth = "with authentication" if self.settings.users else "no authentication"
            logger.info("inbound %s: SOCKS5+HTTP proxy on %s (%s)", self.tag, where, auth)
            task_status.started()
            await serve_listener(listener, self._handle, tg, what=f"inbound {self.tag}")

    def status(self) -> InboundReport:
        return InboundReport(
            tag=self.tag,
            type=self.type,
            listen=tuple(str(a) for a in self.addresses),
            accepted=self.accepted,
        )

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        registry = self.dispatcher.registry
        try:
            source: Address | None = Address.from_sockaddr(
                stream.extra(SocketAttribute.remote_address)  # noqa: S610
            )
        except (OSError, ValueError, anyio.TypedAttributeLookupError):
            source = None
        ctx = registry.open(self.tag, "tcp", source)
        try:
            with registry.cancel_scope(ctx):  # the control socket's close_connection
                async with stream:
                    ended = False
                    try:
                        await self._serve(stream, ctx)
                        ended = True
                    finally:
                        if not ended:  # cancelled (shutdown, close_connection) or failed
                            reset_on_close(stream)
        except Exception as exc:
            if is_connection_noise(exc):
                logger.debug("#%d connection noise: %r", ctx.id, exc)
            else:
                self.failed_handlers += 1
                logger.exception("#%d proxy handler failed", ctx.id)
        finally:
            registry.close(ctx)

    async def _serve(self, stream: anyio.abc.SocketStream, ctx: ConnContext) -> None:
        first = b""
        with anyio.move_on_after(self.settings.handshake_timeout):
            first = await stream.receive(READ_SIZE)
        if not first:
            logger.debug("#%d client sent nothing", ctx.id)
            return
        if first[0] == SOCKS5_VERSION:
            await handle_socks5(stream, first, ctx, self.dispatcher, self.settings)
        else:
            await handle_http(stream, first, ctx, self.dispatcher, self.settings)
