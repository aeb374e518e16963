"""The client daemon: builds outbounds, router and inbounds from config and runs them.

Structure (one task group, owned by `Daemon.run`): every outbound's `run()` is started first
(`tg.start`, so an outbound is ready before traffic arrives), then every inbound's `run()`.
`stop()` (or SIGINT/SIGTERM with `run_daemon`) cancels the group; teardown is shielded and
bounded in time.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ostp_client.config import ClientConfig, LocalProxyInboundConfig
from ostp_client.connections import ConnectionRegistry, Dispatcher
from ostp_client.inbounds import Inbound, build_inbound
from ostp_client.inbounds.local_proxy import LocalProxyInbound
from ostp_client.outbounds import Outbound, OutboundContext, build_outbound
from ostp_client.router import Router
from ostp_client.sysproxy import SystemProxy, SystemProxyError, SystemProxyGuard

__all__ = ["Daemon", "run_daemon"]

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
"""Seconds teardown may take after a stop request."""


class Daemon:
    """One running client. Construct from a validated `ClientConfig`, then `await run()`.

    Attributes for the control socket: `registry` (live connections), `router` (rule hit
    counters), `outbounds` and `inbounds` (by tag, each with `status()`).
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        outbounds: Mapping[str, Outbound] | None = None,
    ) -> None:
        self.config = config
        self.registry = ConnectionRegistry()
        if outbounds is None:
            context = OutboundContext(config)
            outbounds = {o.tag: build_outbound(o, context) for o in config.outbounds}
        self.outbounds: dict[str, Outbound] = dict(outbounds)
        self.router = Router(config.routing, self.outbounds)
        self.dispatcher = Dispatcher(self.router, self.outbounds, self.registry)
        self.inbounds: dict[str, Inbound] = {
            i.tag: build_inbound(i, self.dispatcher) for i in config.inbounds
        }
        self._cancel: anyio.CancelScope | None = None
        self._stop_requested = False
        self.started = anyio.Event()
        self._on_started: list[Callable[[Daemon], None]] = []

    def on_started(self, callback: Callable[[Daemon], None]) -> None:
        """Call `callback(daemon)` once every inbound accepts (e.g. set the system proxy)."""
        self._on_started.append(callback)

    def stop(self) -> None:
        """Request a graceful stop (safe to call from any task of the daemon's event loop)."""
        self._stop_requested = True
        if self._cancel is not None:
            self._cancel.cancel()

    async def run(self, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()` or cancellation."""
        with anyio.CancelScope() as scope:
            self._cancel = scope
            if self._stop_requested:
                scope.cancel()
            for inbound in self.inbounds.values():
                # The routing mark must be in place before outbounds open their first sockets.
                claim = getattr(inbound, "claim_routing_mark", None)
                if claim is not None:
                    claim()
            async with anyio.create_task_group() as tg:
                for outbound in self.outbounds.values():
                    await tg.start(outbound.run, name=f"outbound {outbound.tag}")
                for inbound in self.inbounds.values():
                    await tg.start(inbound.run, name=f"inbound {inbound.tag}")
                self.started.set()
                for callback in self._on_started:
                    callback(self)
                logger.info(
                    "ostp-client running: %d inbound(s), %d outbound(s), %d rule(s)",
                    len(self.inbounds),
                    len(self.outbounds),
                    len(self.config.routing.rules),
                )
                task_status.started(self)
        logger.info("ostp-client stopped (%d connections served)", self.registry.closed_total)

    def status(self) -> dict[str, Any]:
        return {
            "inbounds": [i.status() for i in self.inbounds.values()],
            "outbounds": [o.status() for o in self.outbounds.values()],
            "routing": self.router.stats(),
            "connections": self.registry.snapshot(),
        }


async def run_daemon(
    config: ClientConfig, *, handle_signals: bool = True, config_path: str | None = None
) -> Daemon:
    """Run a daemon until SIGINT/SIGTERM (graceful stop) and return it.

    Also serves the control socket (`reload` and SIGHUP re-read `config_path`).
    """
    from ostp_client.control.server import serve_control  # noqa: PLC0415

    daemon = Daemon(config)
    proxy = await _system_proxy(config)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon, config_path, handle_signals)
        if handle_signals:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        logger.info("received %s, shutting down", signal.Signals(signum).name)
                        daemon.stop()
                        return

            tg.start_soon(watch_signals)
        finished = anyio.Event()

        async def run_and_signal(*, task_status: TaskStatus[Daemon]) -> None:
            try:
                await daemon.run(task_status=task_status)
            finally:
                finished.set()

        async with AsyncExitStack() as stack:
            await tg.start(run_and_signal)
            if proxy is not None:
                await _enter_system_proxy(stack, proxy, daemon)
            await finished.wait()
        tg.cancel_scope.cancel()
    return daemon


async def _system_proxy(config: ClientConfig) -> SystemProxy | None:
    """The desktop's proxy settings, after undoing what a crashed earlier run left set.

    Recovery runs at every start (cheap without a state file); None when no inbound asks for
    ``set_system_proxy`` or the desktop has no supported proxy settings.
    """
    wanted = any(
        isinstance(i, LocalProxyInboundConfig) and i.set_system_proxy for i in config.inbounds
    )
    try:
        proxy = SystemProxy.for_this_system()
        if await anyio.to_thread.run_sync(proxy.recover_stale):
            logger.warning("restored the system proxy settings a previous run left behind")
    except SystemProxyError as exc:
        if wanted:
            logger.warning(
                'cannot set the system proxy: %s; use `eval "$(ostp-client proxy-env)"`', exc
            )
        return None
    return proxy if wanted else None


async def _enter_system_proxy(stack: AsyncExitStack, proxy: SystemProxy, daemon: Daemon) -> None:
    for inbound in daemon.inbounds.values():
        if not (isinstance(inbound, LocalProxyInbound) and inbound.config.set_system_proxy):
            continue
        address = inbound.addresses[0]
        host = "127.0.0.1" if address.host in ("0.0.0.0", "::") else address.host
        try:
            await stack.enter_async_context(SystemProxyGuard(proxy, host, address.port))
        except SystemProxyError as exc:
            logger.warning(
                'cannot set the system proxy: %s; for shells: eval "$(ostp-client proxy-env)"',
                exc,
            )
            return
        logger.info("system proxy set to %s:%d (restored at exit)", host, address.port)
        return
