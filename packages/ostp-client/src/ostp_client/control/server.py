"""The control server inside the daemon: a Unix socket speaking `control.protocol`.

One task per client (in the server's task group); each subscription is one more task in the
client's own group, so a client that goes away takes its subscriptions with it. Writes to a
client are serialized by a lock and bounded in time (a stuck reader is dropped, the daemon is
not). A line that is not a valid request is answered with an error and the connection stays.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import BaseModel, ValidationError

from ostp_client.config import DEFAULT_TEST_URL, ConfigError, load_config
from ostp_client.connections import is_connection_noise
from ostp_client.control import pipes
from ostp_client.control.listeners import open_control_listener
from ostp_client.control.logs import LogRing, installed
from ostp_client.control.protocol import (
    LEVELS,
    MAX_LINE,
    TOPICS,
    ActionResult,
    ConnectionInfo,
    ConnectionList,
    DaemonStatus,
    DelayResult,
    ErrorCode,
    ErrorInfo,
    Event,
    Hello,
    InboundStatus,
    MemberStatus,
    OutboundStatus,
    ReloadResult,
    Request,
    Response,
    RouteRule,
    RouteTable,
    SessionStatus,
    SubscribeResult,
    default_socket_path,
    encode,
)
from ostp_client.errors import OstpClientError
from ostp_client.flow import Outbound, OutboundError, OutboundReport
from ostp_client.outbounds.group import GroupOutbound, GroupReport, SelectorOutbound, url_test
from ostp_client.outbounds.ostp.status import OstpReport
from ostp_client.outbounds.ostp.status import SessionStatus as SessionReport
from ostp_client.reload import ReloadError
from ostp_client.sdnotify import get_notifier
from ostp_client.serving import run_contained, serve_listener

if TYPE_CHECKING:
    from ostp_client.running import RunningDaemon

__all__ = [
    "ControlServer",
    "RequestFailed",
    "reload_config",
    "serve_control",
]

logger = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0
"""A client that does not read for this long is disconnected."""
SAMPLE_INTERVAL = 1.0
"""Seconds between rate samples."""
MIN_INTERVAL_MS = 50


class RequestFailed(OstpClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------
# daemon data → protocol models


def _uptime(since: float | None, now: float) -> float | None:
    """Seconds connected (Unix times), None while not connected."""
    return max(0.0, now - since) if since is not None else None


def _session_model(
    session: SessionReport, server: str, now: float, rates: tuple[float, float]
) -> SessionStatus:
    """One ostp session as the control protocol shows it."""
    return SessionStatus(
        id=str(session.index),
        rate_up=rates[0],
        rate_down=rates[1],
        state=session.state,
        server=server,
        rtt_ms=session.rtt_ms,
        bytes_up=session.bytes_up,
        bytes_down=session.bytes_down,
        uptime=_uptime(session.connected_since, now),
        reconnects=session.reconnects,
        replacements=session.replacements,
        mapped_address=session.mapped_address,
        datagram_size=session.datagram_size,
        kernel_drops=session.kernel_drops,
        socket_buffer=session.socket_buffer,
        transport=session.transport,
    )


class _Rates:
    """Byte counters sampled every `SAMPLE_INTERVAL`; rate = delta / elapsed."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}
        self.rates: dict[str, tuple[float, float]] = {}

    def sample(self, key: str, now: float, up: int, down: int) -> None:
        last = self._last.get(key)
        if last is not None and now > last[0]:
            elapsed = now - last[0]
            self.rates[key] = (max(0, up - last[1]) / elapsed, max(0, down - last[2]) / elapsed)
        self._last[key] = (now, up, down)

    def get(self, key: str) -> tuple[float, float]:
        return self.rates.get(key, (0.0, 0.0))


def describe_rule(conditions: dict[str, list[Any]]) -> str:
    return " ".join(
        f"{name}={','.join(str(v) for v in values)}" for name, values in conditions.items()
    )


@functools.cache  # read once: later, the process may be out of descriptors
def _daemon_version() -> str:
    try:
        return importlib.metadata.version("ostp-client")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------------------------
# reload


async def reload_config(daemon: RunningDaemon, path: str | None) -> ReloadResult:
    """Validate the config at `path` and apply it to the running daemon (`Daemon.reload`).

    Outbounds, inbounds, routing, `mux` and `log.level` are applied live; `control` (and the
    system proxy setting) are reported in `needs_restart`. An invalid config, or one whose new
    parts cannot start (e.g. a port in use), raises `RequestFailed` with the error and leaves
    the running config untouched.
    """
    if path is None:
        raise RequestFailed(ErrorCode.INVALID_PARAMS, "no config file to reload from")
    try:
        new, _warnings = await anyio.to_thread.run_sync(load_config, path)
    except ConfigError as exc:
        raise RequestFailed(ErrorCode.INVALID_CONFIG, str(exc)) from None
    notifier = get_notifier()
    notifier.reloading()  # systemd: RELOADING=1 ... READY=1 (sd_notify(3))
    try:
        outcome = await daemon.reload(new)
    except ReloadError as exc:
        raise RequestFailed(
            ErrorCode.INVALID_CONFIG, f"{path}: not applied, the running configuration stays: {exc}"
        ) from None
    finally:
        notifier.ready()
    message = f"reloaded {path}: " + ("; ".join(outcome.changes) or "nothing changed")
    if outcome.needs_restart:
        message += f"; restart to apply {', '.join(outcome.needs_restart)}"
    logger.info("%s", message)
    return ReloadResult(
        message=message, applied=outcome.applied, needs_restart=outcome.needs_restart
    )


# --------------------------------------------------------------------------------------------
# the server


Handler = Callable[[dict[str, Any]], Awaitable[BaseModel]]


class _Client:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.lock = anyio.Lock()
        self.subscriptions: dict[int | str, anyio.CancelScope] = {}
        self.closed = False

    async def send(self, message: BaseModel) -> None:
        if self.closed:
            return
        data = encode(message)
        async with self.lock:
            try:
                with anyio.fail_after(SEND_TIMEOUT):
                    await self.stream.send(data)
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.closed = True
                await self._hang_up()

    async def _hang_up(self) -> None:
        """End the connection for the task that reads it, which then closes it.

        Closing it from here (a subscription's task) would complete that task's pending read
        under it; on asyncio, anyio's Unix stream then has the socket's readiness callback,
        already queued by the same loop turn, set the finished future again, and asyncio logs
        "Exception in callback Future.set_result(None)" with an InvalidStateError.
        """
        raw = self.stream.extra(anyio.abc.SocketAttribute.raw_socket, None)  # noqa: S610 (anyio, not Django)
        if raw is None:  # a named pipe: its reads run in threads, closing it is safe
            await anyio.aclose_forcefully(self.stream)
            return
        with suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)  # the pending read ends (EOF) on its own


class ControlServer:
    """Serves the control protocol for one `Daemon`.

    `path` defaults to `config.control.socket` or `default_socket_path()`. `config_path` is
    the file `reload` (and SIGHUP when `handle_sighup`) re-reads.
    """

    def __init__(
        self,
        daemon: RunningDaemon,
        path: str | None = None,
        *,
        config_path: str | None = None,
        log_capacity: int = 2000,
        handle_sighup: bool = False,
    ) -> None:
        self.daemon = daemon
        self.path = path or daemon.config.control.socket or default_socket_path()
        self.config_path = config_path
        self.logs = LogRing(log_capacity)
        self.handle_sighup = handle_sighup
        self.started_at = time.time()
        self.rates = _Rates()
        self._closed_by_outbound: dict[str, tuple[int, int]] = {}
        self._seen: dict[int, tuple[str | None, int, int]] = {}
        self.malformed_lines = 0
        self.clients = 0
        self.listening = False
        """True while the socket is served (False when it could not be opened, e.g. taken)."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._handlers: dict[str, Handler] = {
            "hello": self._hello,
            "status": self._status,
            "connections": self._connections,
            "routes": self._routes,
            "logs": self._logs,
            "reconnect": self._reconnect,
            "select": self._select,
            "delay": self._delay,
            "close_connection": self._close_connection,
            "reload": self._reload,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; removes the socket file at exit.

        Raises `StartError` when the socket cannot be served (e.g. another daemon has it).
        """
        with installed(self.logs):
            listener = await open_control_listener(self.path)  # StartError: the daemon stops
            identity = _inode(self.path)
            logger.info("control socket on %s", self.path)
            self.listening = True
            try:
                async with listener, anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._sampler)
                    if self.handle_sighup and hasattr(signal, "SIGHUP"):
                        tg.start_soon(self._watch_sighup)
                    task_status.started()
                    await serve_listener(listener, self._serve_client, tg, what="control socket")
            finally:
                self.listening = False
                if identity is not None and _inode(self.path) == identity:
                    with suppress(OSError):
                        os.unlink(self.path)

    async def _watch_sighup(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                logger.info("SIGHUP: reloading %s", self.config_path)
                await run_contained("SIGHUP reload", self._reload_on_signal)

    async def _reload_on_signal(self) -> None:
        try:
            await reload_config(self.daemon, self.config_path)
        except RequestFailed as exc:
            logger.error("reload refused, keeping the running config: %s", exc.message)

    async def _sampler(self) -> None:
        failed = False
        while True:
            try:
                self.sample(time.time())
                failed = False
            except Exception:
                # a part's status() that fails must not end the control server; say it once
                if not failed:
                    logger.exception("control: sampling the daemon's counters failed")
                failed = True
            await anyio.sleep(SAMPLE_INTERVAL)

    def sample(self, now: float) -> None:
        """Update per-outbound byte totals and rates (also counts connections that closed)."""
        live = self.daemon.registry.live
        for conn_id in list(self._seen):
            if conn_id not in live:
                tag, up, down = self._seen.pop(conn_id)
                if tag is not None:
                    old_up, old_down = self._closed_by_outbound.get(tag, (0, 0))
                    self._closed_by_outbound[tag] = (old_up + up, old_down + down)
        for conn_id, ctx in live.items():
            self._seen[conn_id] = (ctx.outbound_tag, ctx.bytes_up, ctx.bytes_down)
        for outbound in self.status_model(now).outbounds:
            self.rates.sample(outbound.id, now, outbound.bytes_up, outbound.bytes_down)
            for session in outbound.sessions:
                key = f"{outbound.id}/{session.id}"
                self.rates.sample(key, now, session.bytes_up, session.bytes_down)

    # -- data --------------------------------------------------------------------------------

    def _connection_bytes(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        totals = dict(self._closed_by_outbound)
        counts: dict[str, int] = {}
        for ctx in self.daemon.registry.live.values():
            if ctx.outbound_tag is None:
                continue
            up, down = totals.get(ctx.outbound_tag, (0, 0))
            totals[ctx.outbound_tag] = (up + ctx.bytes_up, down + ctx.bytes_down)
            counts[ctx.outbound_tag] = counts.get(ctx.outbound_tag, 0) + 1
        return totals, counts

    def status_model(self, now: float | None = None) -> DaemonStatus:
        now = time.time() if now is None else now
        daemon = self.daemon
        totals, counts = self._connection_bytes()
        outbounds = [
            self._outbound_model(tag, outbound, totals, counts, now)
            for tag, outbound in daemon.outbounds.items()
        ]
        inbounds = []
        for inbound in daemon.inbounds.values():
            report = inbound.status()
            inbounds.append(
                InboundStatus(
                    tag=report.tag,
                    type=report.type,
                    listen=list(report.listen),
                    accepted=report.accepted,
                )
            )
        registry = daemon.registry
        live = registry.live.values()
        return DaemonStatus(
            state="running" if daemon.started.is_set() else "starting",
            version=_daemon_version(),
            pid=os.getpid(),
            uptime=max(0.0, now - self.started_at),
            config_path=self.config_path,
            inbounds=inbounds,
            outbounds=outbounds,
            connections_live=len(registry.live),
            connections_closed=registry.closed_total,
            bytes_up=registry.closed_bytes_up + sum(c.bytes_up for c in live),
            bytes_down=registry.closed_bytes_down + sum(c.bytes_down for c in live),
            time=now,
        )

    def _outbound_model(
        self,
        tag: str,
        outbound: Outbound,
        totals: dict[str, tuple[int, int]],
        counts: dict[str, int],
        now: float,
    ) -> OutboundStatus:
        """One outbound's report as the control protocol shows it, with what the daemon adds:
        rates, live connections, the last check; an ostp outbound's own datagram counters,
        for the others the bytes of the connections routed to them."""
        try:
            report = outbound.status()
        except Exception:
            logger.exception("status() of outbound %s failed", tag)
            report = OutboundReport(tag=tag, type=outbound.type, state="error")
        health = self.daemon.health.entries.get(tag)
        up, down = totals.get(tag, (0, 0))
        rate_up, rate_down = self.rates.get(tag)
        fields: dict[str, Any] = {
            "id": tag,
            "type": report.type,
            "state": report.state,
            "bytes_up": up,
            "bytes_down": down,
            "rate_up": rate_up,
            "rate_down": rate_down,
            "can_reconnect": callable(getattr(outbound, "reconnect", None)),
            "connections": counts.get(tag, 0),
            "can_select": isinstance(outbound, SelectorOutbound),
            "delay_ms": health.delay_ms if health is not None else None,
        }
        match report:
            case OstpReport():
                fields.update(
                    server=report.server,
                    rtt_ms=report.rtt_ms,
                    bytes_up=report.bytes_up,
                    bytes_down=report.bytes_down,
                    uptime=_uptime(report.connected_since, now),
                    reconnects=report.reconnects,
                    mapped_address=report.mapped_address,
                    kernel_drops=report.kernel_drops,
                    transport=report.transport,
                    sessions=[
                        _session_model(
                            item, report.server, now, self.rates.get(f"{tag}/{item.index}")
                        )
                        for item in report.sessions
                    ],
                )
            case GroupReport():
                fields.update(
                    selected=report.selected,
                    chain=list(report.chain),
                    members=[MemberStatus(**dataclasses.asdict(m)) for m in report.members],
                    last_switch=report.last_switch,
                )
        return OutboundStatus(**fields)

    def connections_model(self) -> ConnectionList:
        return ConnectionList(
            connections=[ConnectionInfo(**c) for c in self.daemon.registry.snapshot()],
            time=time.time(),
        )

    def routes_model(self) -> RouteTable:
        router = self.daemon.router
        routing = self.daemon.config.routing
        rules = [
            RouteRule(
                index=index,
                match=rule.describe(),
                outbound=rule.outbound,
                hits=router.rule_hits[index] if index < len(router.rule_hits) else 0,
            )
            for index, rule in enumerate(routing.rules)
        ]
        rules.append(
            RouteRule(
                index=None,
                match="(default)",
                outbound=router.default_outbound,
                hits=router.default_hits,
            )
        )
        return RouteTable(rules=rules, default_outbound=router.default_outbound)

    # -- requests ----------------------------------------------------------------------------

    def hello_model(self) -> Hello:
        methods = [*self._handlers, "subscribe", "unsubscribe"]
        return Hello(version=_daemon_version(), pid=os.getpid(), methods=methods)

    async def _hello(self, params: dict[str, Any]) -> BaseModel:
        return self.hello_model()

    async def _status(self, params: dict[str, Any]) -> BaseModel:
        return self.status_model()

    async def _connections(self, params: dict[str, Any]) -> BaseModel:
        return self.connections_model()

    async def _routes(self, params: dict[str, Any]) -> BaseModel:
        return self.routes_model()

    async def _logs(self, params: dict[str, Any]) -> BaseModel:
        limit = _int_param(params, "limit", 200)
        after = _int_param(params, "after", 0)
        return self.logs.since(after, _level_param(params), limit)

    async def _reconnect(self, params: dict[str, Any]) -> BaseModel:
        tag = params.get("outbound")
        outbound = self.daemon.outbounds.get(str(tag)) if tag is not None else None
        if outbound is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no outbound tagged {tag!r}")
        action = getattr(outbound, "reconnect", None)
        if not callable(action):
            raise RequestFailed(
                ErrorCode.UNSUPPORTED, f"outbound {tag!r} ({outbound.type}) has no sessions"
            )
        logger.info("control: reconnect outbound %s", tag)
        with anyio.fail_after(SEND_TIMEOUT):
            await action()
        return ActionResult(message=f"reconnecting {tag}")

    async def _select(self, params: dict[str, Any]) -> BaseModel:
        group_tag, member = params.get("group"), params.get("outbound")
        if not isinstance(group_tag, str) or not isinstance(member, str):
            raise RequestFailed(
                ErrorCode.INVALID_PARAMS, "params.group and params.outbound must be tags"
            )
        group = self.daemon.outbounds.get(group_tag)
        if group is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no outbound tagged {group_tag!r}")
        if not isinstance(group, SelectorOutbound):
            raise RequestFailed(
                ErrorCode.UNSUPPORTED,
                f"{group_tag!r} is a {group.type} outbound; only selector groups take a choice",
            )
        try:
            await anyio.to_thread.run_sync(group.select, member)  # writes the state file
        except ValueError as exc:
            raise RequestFailed(ErrorCode.NOT_FOUND, str(exc)) from None
        return ActionResult(message=f"{group_tag}: {member} selected")

    async def _delay(self, params: dict[str, Any]) -> BaseModel:
        tag, url = params.get("outbound"), params.get("url")
        if url is not None and not isinstance(url, str):
            raise RequestFailed(ErrorCode.INVALID_PARAMS, "params.url must be a string")
        outbound = self.daemon.outbounds.get(str(tag)) if tag is not None else None
        if outbound is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no outbound tagged {tag!r}")
        if url is not None:
            try:
                from ostp_client.config import validate_test_url  # noqa: PLC0415

                validate_test_url(url)
            except ValueError as exc:
                raise RequestFailed(ErrorCode.INVALID_PARAMS, str(exc)) from None
        groups = self.daemon.groups()
        health = self.daemon.health
        if isinstance(outbound, GroupOutbound):
            url = url or outbound.url or _group_url(groups.values(), outbound.tag)
            logger.info("control: checking the members of %s via %s", outbound.tag, url)
            await outbound.check_all(url)
            tags = outbound.members
        else:
            url = url or _group_url(groups.values(), outbound.tag)
            logger.info("control: checking %s via %s", outbound.tag, url)
            timeout = next((g.timeout for g in groups.values() if outbound.tag in g.members), 5.0)
            try:
                delay = await url_test(outbound, url, timeout)
            except (OutboundError, TimeoutError, OSError) as exc:
                health.failed(outbound.tag, str(exc) or "timed out")
            else:
                health.succeeded(outbound.tag, delay)
            for group in groups.values():
                if outbound.tag in group.members:
                    group.reselect(f"check of {outbound.tag}")
            tags = [outbound.tag]
        results = []
        for member in tags:
            entry = health.get(member)
            found = self.daemon.outbounds.get(member)
            results.append(
                MemberStatus(
                    tag=member,
                    type=found.type if found is not None else "missing",
                    state=str(getattr(found, "state", "ready")),
                    usable=entry.alive is not False,
                    **entry.snapshot(),
                )
            )
        selected = outbound.selected if isinstance(outbound, GroupOutbound) else None
        return DelayResult(outbound=outbound.tag, url=url, results=results, selected=selected)

    async def _close_connection(self, params: dict[str, Any]) -> BaseModel:
        conn_id = params.get("id")
        if not isinstance(conn_id, int) or isinstance(conn_id, bool):
            raise RequestFailed(ErrorCode.INVALID_PARAMS, "params.id must be an integer")
        if not self.daemon.registry.cancel(conn_id):
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no live connection #{conn_id}")
        logger.info("control: closed connection #%d", conn_id)
        return ActionResult(message=f"closed #{conn_id}")

    async def _reload(self, params: dict[str, Any]) -> BaseModel:
        path = params.get("path", self.config_path)
        if path is not None and not isinstance(path, str):
            raise RequestFailed(ErrorCode.INVALID_PARAMS, "params.path must be a string")
        return await reload_config(self.daemon, path)

    # -- subscriptions -----------------------------------------------------------------------

    def _snapshot(self, topic: str) -> BaseModel:
        if topic == "status":
            return self.status_model()
        if topic == "connections":
            return self.connections_model()
        return self.routes_model()

    async def _subscription(
        self,
        client: _Client,
        request: Request,
        topic: str,
        interval: float,
        level: str,
        backlog: int,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            with scope:
                if topic == "logs":
                    after = self.logs.seq
                    if backlog > 0:
                        batch = self.logs.since(0, level, backlog)
                        if batch.lines:
                            await client.send(
                                Event(subscription=request.id, topic="logs", data=batch)
                            )
                    while not client.closed:
                        if self.logs.seq > after:
                            batch = self.logs.since(after, level)
                            after = self.logs.seq
                            if batch.lines or batch.dropped:
                                await client.send(
                                    Event(subscription=request.id, topic="logs", data=batch)
                                )
                        await anyio.sleep(min(interval, 0.2))
                else:
                    while not client.closed:
                        data = self._snapshot(topic)
                        await client.send(Event(subscription=request.id, topic=topic, data=data))  # type: ignore[arg-type]
                        await anyio.sleep(interval)
        finally:
            if client.subscriptions.get(request.id) is scope:
                client.subscriptions.pop(request.id, None)

    def _subscribe(
        self, client: _Client, request: Request, tg: anyio.abc.TaskGroup
    ) -> SubscribeResult:
        params = request.params
        topic = params.get("topic")
        if topic not in TOPICS:
            raise RequestFailed(
                ErrorCode.INVALID_PARAMS, f"params.topic must be one of {', '.join(TOPICS)}"
            )
        if request.id in client.subscriptions:
            raise RequestFailed(ErrorCode.INVALID_PARAMS, f"subscription {request.id!r} exists")
        interval = max(MIN_INTERVAL_MS, _int_param(params, "interval_ms", 1000)) / 1000
        level = _level_param(params)
        backlog = _int_param(params, "backlog", 0)
        scope = anyio.CancelScope()
        client.subscriptions[request.id] = scope
        # a subscription that fails ends alone (logged): not its client, not the daemon
        tg.start_soon(
            run_contained,
            f"control subscription {request.id!r} ({topic})",
            self._subscription,
            client,
            request,
            topic,
            interval,
            level,
            backlog,
            scope,
        )
        return SubscribeResult(subscription=request.id, topic=topic)

    def _unsubscribe(self, client: _Client, params: dict[str, Any]) -> ActionResult:
        sub = params.get("subscription")
        scope = client.subscriptions.pop(sub, None) if isinstance(sub, int | str) else None
        if scope is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no subscription {sub!r}")
        scope.cancel()
        return ActionResult(message=f"unsubscribed {sub}")

    # -- one client --------------------------------------------------------------------------

    async def _serve_client(self, stream: anyio.abc.ByteStream) -> None:
        self.clients += 1
        client = _Client(stream)
        reader = BufferedByteReceiveStream(stream)
        try:
            async with anyio.create_task_group() as tg:
                await client.send(self.hello_model())
                while not client.closed:
                    try:
                        line = await reader.receive_until(b"\n", MAX_LINE)
                    except anyio.DelimiterNotFound:
                        await client.send(_error(None, ErrorCode.MALFORMED, "line too long"))
                        break
                    except (
                        anyio.IncompleteRead,
                        anyio.EndOfStream,
                        anyio.BrokenResourceError,  # a client that hung up with unread replies
                        anyio.ClosedResourceError,
                        OSError,
                    ) as exc:
                        logger.debug("control client gone: %r", exc)
                        break
                    if line.strip():
                        await self._handle_line(client, line, tg)
                tg.cancel_scope.cancel()
        except Exception as exc:
            # The client's own end (also inside the group of its subscriptions): never the
            # control server's, nor the daemon's.
            if is_connection_noise(exc):
                logger.debug("control client dropped: %r", exc)
            else:
                logger.exception("control client handler failed")
        finally:
            self.clients -= 1
            client.closed = True
            with anyio.CancelScope(shield=True):
                # let a just-cancelled receive finish its cleanup before closing: anyio's Unix
                # stream raises InvalidStateError otherwise (agronholm/anyio#1267)
                await anyio.lowlevel.checkpoint()
                await anyio.aclose_forcefully(stream)

    async def _handle_line(self, client: _Client, line: bytes, tg: anyio.abc.TaskGroup) -> None:
        try:
            request = Request.model_validate_json(line)
        except ValidationError as exc:
            self.malformed_lines += 1
            request_id = _salvage_id(line)
            await client.send(_error(request_id, ErrorCode.MALFORMED, _short(exc)))
            return
        try:
            if request.method == "subscribe":
                result: BaseModel = self._subscribe(client, request, tg)
            elif request.method == "unsubscribe":
                result = self._unsubscribe(client, request.params)
            else:
                handler = self._handlers.get(request.method)
                if handler is None:
                    raise RequestFailed(
                        ErrorCode.UNKNOWN_METHOD, f"unknown method {request.method!r}"
                    )
                result = await handler(request.params)
        except RequestFailed as exc:
            await client.send(_error(request.id, exc.code, exc.message))
            return
        except Exception as exc:
            logger.exception("control request %s failed", request.method)
            await client.send(
                _error(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            )
            return
        await client.send(Response(id=request.id, ok=True, result=result.model_dump(mode="json")))


def _group_url(groups: Any, tag: str) -> str:
    """The test URL of the first group that checks `tag` (or is `tag`), else the default."""
    for group in groups:
        if group.url is not None and (group.tag == tag or tag in group.members):
            return str(group.url)
    return DEFAULT_TEST_URL


def _error(request_id: int | str | None, code: str, message: str) -> Response:
    return Response(id=request_id, ok=False, error=ErrorInfo(code=code, message=message))


def _short(exc: ValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {"msg": str(exc)}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"not a request: {where + ': ' if where else ''}{first.get('msg', '')}"


def _salvage_id(line: bytes) -> int | str | None:
    import json  # noqa: PLC0415

    try:
        data = json.loads(line)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), int | str):
        value: int | str = data["id"]
        return value
    return None


def _int_param(params: dict[str, Any], name: str, default: int) -> int:
    """A count, a sequence number or an interval: an integer, 0 or more."""
    value = params.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestFailed(ErrorCode.INVALID_PARAMS, f"params.{name} must be an integer")
    if value < 0:
        raise RequestFailed(
            ErrorCode.INVALID_PARAMS, f"params.{name} must be 0 or more (got {value})"
        )
    return value


def _level_param(params: dict[str, Any]) -> str:
    level = params.get("level", "debug")
    if level not in LEVELS:
        raise RequestFailed(ErrorCode.INVALID_PARAMS, f"params.level must be one of {LEVELS}")
    return str(level)


def _inode(path: str) -> tuple[int, int] | None:
    if pipes.is_pipe_path(path):
        return None  # a pipe goes with its handles; stat() would connect to it
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


async def serve_control(
    daemon: RunningDaemon,
    config_path: str | None = None,
    handle_sighup: bool = True,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the control server for `daemon` unless `control.socket` is `""` (disabled)."""
    if daemon.config.control.socket == "":
        task_status.started()
        return
    server = ControlServer(daemon, config_path=config_path, handle_sighup=handle_sighup)
    await server.run(task_status=task_status)
