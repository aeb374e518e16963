"""The client daemon: builds outbounds, router and inbounds from config and runs them.

Structure (one task group, owned by `Daemon.run`): every outbound's `run()` is started first
(`tg.start`, so an outbound is ready before traffic arrives), then every inbound's `run()`.
Each of those runs in its own cancel scope, so that `reload()` can start and stop single parts
while the others keep running. `stop()` (or SIGINT/SIGTERM with `run_daemon`) cancels the
group; teardown is shielded and bounded in time.

Reload (`Daemon.reload`, used by the control socket's `reload` and by SIGHUP) compares the new
config with the running one, part by part:

- outbounds: an unchanged one keeps running untouched (an ostp outbound keeps its sessions and
  streams). An added one is built and started; a removed one is stopped and its connections
  are closed. A changed one (its config block, or for ostp the `mux` that applies to it) is
  replaced: the new one starts, new connections go to it, and the old one keeps serving its
  connections until they end or `reload_grace` seconds have passed, then it stops.
- inbounds: a `local_proxy` whose `listen`/`port` did not change is updated in place (users,
  udp, timeouts apply to new connections; its listener and connections stay). One with a new
  address gets a new listener; the old listener closes, with its connections. A `tun` inbound
  restarts only when its own config changed, which drops the TUN's connections.
- groups (`selector`, `urltest`, `fallback`) are outbounds: an unchanged group keeps running
  (its choice and health data stay) and follows members that were replaced.
- routing (a new router; hit counters restart) and `log.level` apply at once; `control` and
  the system proxy setting take effect after a restart only. Rule-set files are re-read when
  they changed (also between reloads: `RULE_SET_POLL`).

Everything that can fail happens before anything is switched: the config is validated, the
router and the new parts are built, the new parts are started (listeners bound). A failure
stops what was started, restarts what had to be stopped first (a listener on the same port,
a TUN), and raises `ReloadError`: the running config stays.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from ostp_client.config import (
    ClientConfig,
    LocalProxyInboundConfig,
)
from ostp_client.connections import ConnectionRegistry, Dispatcher
from ostp_client.inbounds import Inbound, build_inbound
from ostp_client.inbounds.base import StartError, os_reason
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound
from ostp_client.outbounds import Outbound, OutboundContext, build_outbound
from ostp_client.outbounds.group import (
    GroupOutbound,
    HealthBook,
    SelectionStore,
    default_state_dir,
)
from ostp_client.process_info import ProcessInfo, ProcessResolver
from ostp_client.reload import ReloadError, ReloadOutcome, ReloadPlan, plan_reload
from ostp_client.router import Router
from ostp_client.serving import run_contained
from ostp_client.sysproxy import SystemProxy, SystemProxyError, SystemProxyGuard

__all__ = ["RELOAD_GRACE", "Daemon", "run_daemon"]

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
"""Seconds teardown may take after a stop request."""
RELOAD_GRACE = 10.0
"""Seconds a replaced outbound keeps serving the connections it already carries."""
_RETIRE_POLL = 0.1
RULE_SET_POLL = 3.0
"""Seconds between looks at the rule-set files' modification times."""
SELECTIONS_FILE = "selections.json"

Part = Outbound | Inbound


class _StartedFlag:
    """A part's task status that remembers whether the part said it had started."""

    def __init__(self, status: TaskStatus[None]) -> None:
        self._status = status
        self.started_yet = False

    def started(self, value: None = None) -> None:
        self.started_yet = True
        self._status.started(value)


@dataclass(eq=False, slots=True)
class _Task:
    """One part's `run()` inside the daemon's task group."""

    part: Part
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


def _system_proxy_target(config: ClientConfig) -> tuple[str, int] | None:
    for item in config.inbounds:
        if isinstance(item, LocalProxyInboundConfig) and item.set_system_proxy:
            return (item.listen, item.port)
    return None


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
        state_dir: Path | None = None,
        config_key: str = "",
    ) -> None:
        """`state_dir`: where selector choices are kept (`selections.json`, under the key
        `config_key`, the config file's path); None keeps them in memory only."""
        self.config = config
        self.registry = ConnectionRegistry()
        self.health = HealthBook()
        self.selections = SelectionStore(
            state_dir / SELECTIONS_FILE if state_dir is not None else None, config_key
        )
        self.outbounds: dict[str, Outbound] = {}
        if outbounds is None:
            context = self._context(config)
            for item in config.outbounds:
                self.outbounds[item.tag] = build_outbound(item, context)
        else:
            self.outbounds.update(outbounds)
        self.process_resolver = ProcessResolver() if sys.platform.startswith("linux") else None
        self.router = self._router(config, list(self.outbounds))
        self.dispatcher = Dispatcher(self.router, self.outbounds, self.registry)
        self.inbounds: dict[str, Inbound] = {
            i.tag: build_inbound(i, self.dispatcher) for i in config.inbounds
        }
        self.reload_grace = RELOAD_GRACE
        """Seconds a replaced outbound keeps serving its connections after a reload."""
        self._cancel: anyio.CancelScope | None = None
        self._stop_requested = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._tasks: dict[int, _Task] = {}
        self._reload_lock = anyio.Lock()
        self.started = anyio.Event()
        self._on_started: list[Callable[[Daemon], None]] = []

    def _context(self, config: ClientConfig) -> OutboundContext:
        return OutboundContext(
            config, table=self.outbounds, health=self.health, selections=self.selections
        )

    def _router(self, config: ClientConfig, tags: list[str] | None = None) -> Router:
        return Router(
            config.routing,
            tags if tags is not None else [o.tag for o in config.outbounds],
            base_dir=config.base_dir,
            process_lookup=self._lookup_process,
        )

    def _lookup_process(self, source: Any, network: str) -> ProcessInfo | None:
        resolver = self.process_resolver
        if resolver is None:
            return None
        return resolver((source.host, source.port), network)

    def groups(self) -> dict[str, GroupOutbound]:
        return {t: o for t, o in self.outbounds.items() if isinstance(o, GroupOutbound)}

    async def _watch_rule_sets(self) -> None:
        while True:
            await anyio.sleep(RULE_SET_POLL)
            router = self.router
            if any(f.changed() for f in router.rule_sets.values()):
                await anyio.to_thread.run_sync(router.refresh_rule_sets)

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
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    for outbound in self.outbounds.values():
                        await self._start(outbound, "outbound")
                    for inbound in self.inbounds.values():
                        await self._start(inbound, "inbound")
                    tg.start_soon(self._watch_rule_sets, name="rule-set files")
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
            finally:
                self._tg = None
        logger.info("ostp-client stopped (%d connections served)", self.registry.closed_total)

    # -- parts -------------------------------------------------------------------------------

    async def _start(self, part: Part, kind: str) -> None:
        """Start `part.run()` in the daemon's group; returns once it is ready (or raises)."""
        if self._tg is None:
            raise RuntimeError("the daemon is not running")
        task = _Task(part)
        self._tasks[id(part)] = task
        try:
            await self._tg.start(self._run_part, task, kind, name=f"{kind} {part.tag}")
        except BaseException as exc:
            self._tasks.pop(id(part), None)
            if isinstance(exc, OSError) and not isinstance(exc, StartError):
                # e.g. the TUN device or its routes: one line that names the part
                raise StartError(
                    f'{kind} "{part.tag}" cannot start: {os_reason(exc)}', exc.errno
                ) from exc
            raise

    async def _run_part(self, task: _Task, kind: str, *, task_status: TaskStatus[None]) -> None:
        status = _StartedFlag(task_status)
        try:
            with task.scope:
                await task.part.run(task_status=status)
        except Exception:
            if not status.started_yet:
                raise  # it could not start: the caller (start, reload) reports that
            # One part's failure does not end the daemon: the others keep serving.
            logger.exception(
                "%s %s stopped after an error; the rest keeps running", kind, task.part.tag
            )
        finally:
            task.done.set()

    async def _stop(self, part: Part) -> None:
        """Cancel `part.run()` and wait (bounded) until its teardown is done."""
        task = self._tasks.pop(id(part), None)
        if task is None:
            return
        task.scope.cancel()
        with anyio.move_on_after(SHUTDOWN_GRACE, shield=True):
            await task.done.wait()

    async def _retire(self, outbound: Outbound, conn_ids: list[int]) -> None:
        """Stop a replaced outbound once its connections ended or after `reload_grace`."""
        with anyio.move_on_after(self.reload_grace):
            while any(i in self.registry.live for i in conn_ids):  # noqa: ASYNC110 (no event)
                await anyio.sleep(_RETIRE_POLL)
        closed = sum(self.registry.cancel(i) for i in conn_ids)  # reset (RST), not a clean end
        if closed:
            logger.info(
                "replaced outbound %s: closed %d connection(s) after %.0f s",
                outbound.tag,
                closed,
                self.reload_grace,
            )
        await self._stop(outbound)
        logger.info("replaced outbound %s stopped", outbound.tag)

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: ClientConfig) -> ReloadOutcome:
        """Apply a validated config to the running daemon (see the module docstring).

        Raises `ReloadError` when it cannot be applied; then nothing changed.
        """
        async with self._reload_lock:
            if self._tg is None or not self.started.is_set():
                raise ReloadError("the daemon is not running")
            old = self.config
            plan = self._plan(old, new)
            await self._start_new_parts(plan, old)
            old_outbounds = dict(self.outbounds)
            outcome = self._switch(old, new, plan)
            await self._stop_old_parts(old_outbounds, plan, outcome)
            return outcome

    def _plan(self, old: ClientConfig, new: ClientConfig) -> ReloadPlan:
        return plan_reload(
            old,
            new,
            router=self.router,
            make_router=self._router,
            outbounds=self.outbounds,
            inbounds=self.inbounds,
            context=self._context(new),
            dispatcher=self.dispatcher,
        )

    async def _start_new_parts(self, plan: ReloadPlan, old: ClientConfig) -> None:
        """Start the new parts (bind listeners, open the TUN); on failure undo and raise."""
        started: list[Part] = []
        stopped: list[Inbound] = []
        try:
            for outbound in plan.fresh_outbounds:
                await self._start(outbound, "outbound")
                started.append(outbound)
            for inbound in plan.stop_first:  # its port or the TUN is needed by a new inbound
                await self._stop(inbound)
                stopped.append(inbound)
            for inbound in plan.fresh_inbounds:
                await self._start(inbound, "inbound")
                started.append(inbound)
        except Exception as exc:
            for part in reversed(started):
                await self._stop(part)
            configs = {entry.tag: entry for entry in old.inbounds}
            for inbound in stopped:
                await self._restart_inbound(inbound, configs[inbound.tag])
            raise ReloadError(f"cannot start the new configuration: {exc}") from exc

    def _switch(self, old: ClientConfig, new: ClientConfig, plan: ReloadPlan) -> ReloadOutcome:
        """Make the new parts current. No awaits: the router never names a missing tag."""
        changed = {
            "routing": plan.router is not self.router,
            "log.level": new.log.level != old.log.level,
            "outbounds": list(plan.outbounds.items()) != list(self.outbounds.items()),
            "inbounds": list(plan.inbounds.items()) != list(self.inbounds.items())
            or bool(plan.updates),
            "mux": new.mux != old.mux,
        }
        outcome = ReloadOutcome(applied=[name for name, yes in changed.items() if yes])
        self.outbounds.clear()  # the dispatcher holds this very dict
        self.outbounds.update(plan.outbounds)
        self.inbounds.clear()
        self.inbounds.update(plan.inbounds)
        if changed["routing"]:
            self.router = plan.router
            self.dispatcher.router = plan.router
            outcome.changes.append("routing")
        for group in self.groups().values():
            group.members_changed()
        if changed["log.level"]:
            logging.getLogger().setLevel(getattr(logging, new.log.level.upper()))
            outcome.changes.append(f"log.level {new.log.level}")
        for running, fresh in plan.updates:
            running.config = fresh.config
            running.settings = fresh.settings
            outcome.changes.append(f"inbound {running.tag} updated")
        if new.control != old.control:
            outcome.needs_restart.append("control")
            outcome.changes.append("control: the control socket moves at the next restart")
        if _system_proxy_target(new) != _system_proxy_target(old):
            outcome.needs_restart.append("set_system_proxy")
            outcome.changes.append("set_system_proxy: applies at the next restart")
        if new.log.model_copy(update={"level": old.log.level}) != old.log:
            outcome.needs_restart.append("log")
            outcome.changes.append("log output/format: applies at the next restart")
        if new.metrics != old.metrics:
            outcome.needs_restart.append("metrics")
            outcome.changes.append("metrics: the endpoint moves at the next restart")
        # what runs until a restart stays in the running config, so the next reload compares
        # against it and says "needs restart" again
        self.config = new.model_copy(
            update={
                "control": old.control,
                "metrics": old.metrics,
                "log": old.log.model_copy(update={"level": new.log.level}),
            }
        )
        return outcome

    async def _stop_old_parts(
        self, old_outbounds: dict[str, Outbound], plan: ReloadPlan, outcome: ReloadOutcome
    ) -> None:
        """Stop what went away; a replaced outbound first serves out its connections."""
        live_by_outbound: dict[str | None, list[int]] = {}
        for ctx in self.registry.live.values():
            # through a group, the connection is carried by its member: that one matters too
            for tag in {ctx.outbound_tag, *ctx.via}:
                live_by_outbound.setdefault(tag, []).append(ctx.id)
        changes = outcome.changes
        for tag, outbound in old_outbounds.items():
            conn_ids = live_by_outbound.get(tag, [])
            if tag not in plan.outbounds:
                for conn_id in conn_ids:
                    self.registry.cancel(conn_id)
                await self._stop(outbound)
                changes.append(f"outbound {tag} removed ({len(conn_ids)} connection(s) closed)")
            elif plan.outbounds[tag] is not outbound:
                assert self._tg is not None
                self._tg.start_soon(
                    run_contained,
                    f"retiring outbound {tag}",
                    self._retire,
                    outbound,
                    conn_ids,
                    name=f"retire {tag}",
                )
                changes.append(
                    f"outbound {tag} replaced ({len(conn_ids)} connection(s) stay on the old"
                    f" one for up to {self.reload_grace:.0f} s)"
                )
        changes.extend(
            f"outbound {tag} added" for tag in plan.outbounds if tag not in old_outbounds
        )
        for inbound in plan.leaving:
            await self._stop(inbound)  # no-op for those stopped first
            what = "restarted" if inbound.tag in plan.inbounds else "removed"
            changes.append(f"inbound {inbound.tag} {what}")
        leaving = {i.tag for i in plan.leaving}
        changes.extend(
            f"inbound {i.tag} added" for i in plan.fresh_inbounds if i.tag not in leaving
        )

    async def _restart_inbound(self, stopped: Inbound, config: Any) -> None:
        """Undo for an inbound that was stopped to make room: run it again, on the same port."""
        if isinstance(stopped, LocalProxyInbound) and stopped.addresses and config.port == 0:
            config = config.model_copy(update={"port": stopped.addresses[0].port})
        try:
            inbound = build_inbound(config, self.dispatcher)
            await self._start(inbound, "inbound")
        except Exception:
            logger.exception("reload: inbound %s could not be restarted", config.tag)
            self.inbounds.pop(config.tag, None)
            return
        self.inbounds[config.tag] = inbound
        logger.info("reload: inbound %s restarted with its running config", config.tag)


def _config_key(path: str | None) -> str:
    """The config file's absolute path: the key of its selector choices in the state file."""
    return os.path.abspath(path) if path else ""


async def run_daemon(
    config: ClientConfig, *, handle_signals: bool = True, config_path: str | None = None
) -> Daemon:
    """Run a daemon until SIGINT/SIGTERM (graceful stop) and return it.

    Also serves the control socket (`reload` and SIGHUP re-read `config_path`), the metrics
    endpoint when configured, and tells systemd (`$NOTIFY_SOCKET`) READY=1 once every inbound,
    the control socket and the metrics endpoint listen, STOPPING=1 when it begins to stop.
    """
    from ostp_client.control.server import serve_control  # noqa: PLC0415
    from ostp_client.sdnotify import get_notifier  # noqa: PLC0415

    key = _config_key(config_path)
    daemon = Daemon(config, state_dir=default_state_dir(), config_key=key)
    notifier = get_notifier()
    proxy = await _system_proxy(config)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, daemon, config_path, handle_signals)
        if config.metrics is not None:
            from ostp_client.metrics import serve_metrics  # noqa: PLC0415

            await tg.start(serve_metrics, daemon, config.metrics)
        if handle_signals:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        logger.info("received %s, shutting down", signal.Signals(signum).name)
                        notifier.stopping()
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
            await tg.start(notifier.run, daemon)  # READY=1, watchdog, STOPPING=1 at the end
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
