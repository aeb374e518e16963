"""Outbound groups: `selector`, `urltest` and `fallback`, each an Outbound over member tags.

A group resolves to one member per connection and delegates `connect_tcp`/`open_udp` to it;
the connection's `ConnContext.via` records the group(s) and the member. Members are looked up
by tag in the daemon's live outbound table, so a member replaced by a reload is used at once;
a member may itself be a group (`check` refuses cycles).

- `selector`: the member the user chose (`select()`: `ctl select`, the dashboard), kept in the
  selection store across restarts; else `default`, else the first member.
- `urltest`: every member is checked every `interval` by a real HTTP GET through it to `url`;
  its delay is the time until the response's status line. The group uses the member with the
  lowest delay, and moves away from the one in use only when another is faster by more than
  `tolerance` ms or the one in use fails.
- `fallback`: the first member, in order, that is not known to be down.

A member is down when its last check failed, when its ostp sessions are not connected (the
group listens to its state changes and moves off it at once), or when a connection through it
failed in a way that blames the member: the tunnel is not connected, the server did not answer
in time, or — the fast signal — nothing at all came back from the server within
`SILENCE_AFTER` (+ a few round trips) of asking it for a stream, while a live server
acknowledges within one round trip. Such a connection is retried at once through the next
member (urltest, fallback), so a killed server costs the first new connection about one
second, and every later one nothing. A member that went down is checked again soon
(`RECHECK_AFTER`), and whenever its sessions come back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from anyio.streams.tls import TLSStream

from ostp_client.config import (
    FallbackOutboundConfig,
    SelectorOutboundConfig,
    UrlTestOutboundConfig,
)
from ostp_client.flow import (
    Address,
    ConnContext,
    ConnectTimeout,
    GeneralFailure,
    Outbound,
    OutboundError,
    OutboundReport,
    UdpOutboundSession,
)
from ostp_client.outbounds import OutboundContext, register_outbound

__all__ = [
    "GroupOutbound",
    "GroupReport",
    "HealthBook",
    "MemberHealth",
    "MemberReport",
    "SelectionStore",
    "default_state_dir",
    "url_test",
]

logger = logging.getLogger(__name__)

SILENCE_AFTER = 1.0
"""Seconds without any datagram from a member's server, after asking it for a stream, before
the member counts as down (a live server acknowledges within a round trip, ACK delay 5 ms)."""
SILENCE_RTTS = 4
"""...plus this many of the member's round trips (slow links get more time)."""
RECHECK_AFTER = 1.0
"""Seconds after a member went down before it is checked again."""
MAX_RESPONSE_HEAD = 16384


class MemberFailed(OutboundError):
    """A connection failed in a way that blames the member, not the destination."""


# --------------------------------------------------------------------------------------------
# health


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberReport:
    """One member of a group as the group sees it: its state and its last check."""

    tag: str
    type: str
    state: str
    usable: bool
    """Not known to be down (the group may use it)."""
    delay_ms: float | None
    error: str | None
    checked_at: float | None
    alive: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupReport(OutboundReport):
    """A group (`selector`, `urltest`, `fallback`): the member in use and every member."""

    selected: str
    chain: tuple[str, ...]
    """The member in use through nested groups (`("inner", "proxy-b")`)."""
    url: str | None
    switches: int
    last_switch: str | None
    members: tuple[MemberReport, ...]


@dataclass(slots=True)
class MemberHealth:
    delay_ms: float | None = None
    """Delay of the last successful check."""
    error: str | None = None
    """Why the member is down (last failed check, dropped session, silent server)."""
    checked_at: float | None = None
    """Unix time of the last check or failure."""
    alive: bool | None = None
    """None until the first check."""

    def snapshot(self) -> dict[str, Any]:
        return {
            "delay_ms": None if self.delay_ms is None else round(self.delay_ms, 1),
            "error": self.error,
            "checked_at": self.checked_at,
            "alive": self.alive,
        }


class HealthBook:
    """Health of every checked outbound by tag, shared by the groups of one daemon."""

    def __init__(self) -> None:
        self.entries: dict[str, MemberHealth] = {}

    def get(self, tag: str) -> MemberHealth:
        entry = self.entries.get(tag)
        if entry is None:
            entry = self.entries[tag] = MemberHealth()
        return entry

    def succeeded(self, tag: str, delay_ms: float) -> None:
        entry = self.get(tag)
        entry.delay_ms = delay_ms
        entry.error = None
        entry.alive = True
        entry.checked_at = time.time()

    def failed(self, tag: str, error: str) -> None:
        entry = self.get(tag)
        entry.error = error
        entry.alive = False
        entry.checked_at = time.time()


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/ostp-client`, else `~/.local/state/ostp-client`."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "ostp-client"


class SelectionStore:
    """The members chosen in selector groups, kept in a JSON file across restarts.

    The file (`selections.json` in the state directory) maps a config file's absolute path to
    `{group tag: member tag}`, so that daemons with different configs do not mix their choices.
    A file that cannot be read or written is logged and otherwise ignored.
    """

    def __init__(self, path: Path | None, key: str = "") -> None:
        self.path = path
        self.key = key
        self._choices: dict[str, str] = {}
        if path is not None:
            self._choices = dict(self._read().get(key, {}))

    def _read(self) -> dict[str, dict[str, str]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("selector state %s cannot be read (%s); starting fresh", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            str(k): {str(g): str(m) for g, m in v.items() if isinstance(m, str)}
            for k, v in data.items()
            if isinstance(v, dict)
        }

    def get(self, group: str) -> str | None:
        return self._choices.get(group)

    def set(self, group: str, member: str) -> None:
        self._choices[group] = member
        if self.path is None:
            return
        data = self._read()
        data[self.key] = dict(self._choices)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("selector state %s cannot be written: %s", self.path, exc)


# --------------------------------------------------------------------------------------------
# the check


async def url_test(outbound: Outbound, url: str, time_limit: float) -> float:
    """Milliseconds from asking `outbound` for a connection to `url`'s status line.

    Raises `OutboundError` (or TimeoutError after `time_limit` s) when the request fails.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_header = host if ":" not in host else f"[{host}]"
    if parts.port:
        host_header += f":{parts.port}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: ostp-client\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode()
    ctx = ConnContext(0, "health-check")
    with anyio.fail_after(time_limit):
        start = time.monotonic()
        stream: anyio.abc.ByteStream = await outbound.connect_tcp(Address(host, port), ctx)
        try:
            if secure:
                stream = await TLSStream.wrap(
                    stream,
                    hostname=host,
                    ssl_context=ssl.create_default_context(),
                    standard_compatible=False,
                )
            await stream.send(request)
            head = b""
            while b"\r\n" not in head:
                try:
                    head += await stream.receive()
                except anyio.EndOfStream:
                    raise GeneralFailure("closed before an HTTP answer") from None
                if len(head) > MAX_RESPONSE_HEAD:
                    break
            if not head.startswith(b"HTTP/"):
                raise GeneralFailure("the answer is not HTTP")
            return (time.monotonic() - start) * 1000
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise GeneralFailure(f"connection broke: {exc!r}") from None
        except ssl.SSLError as exc:
            raise GeneralFailure(f"TLS: {exc}") from None
        finally:
            await anyio.aclose_forcefully(stream)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# groups


@dataclass(slots=True)
class _Pending:
    """A member's connect that may outlive the caller (abandoned: its stream is closed)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    stream: anyio.abc.ByteStream | None = None
    error: BaseException | None = None
    abandoned: bool = False


class GroupOutbound(Outbound):
    """An outbound that delegates to one of its members (see the module docstring)."""

    type = "group"
    failover = False
    """Retry a connection through another member when the chosen one fails."""

    def __init__(
        self,
        tag: str,
        members: list[str],
        table: Mapping[str, Outbound],
        health: HealthBook,
        *,
        url: str | None = None,
        interval: float = 180.0,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(tag)
        self.members = list(members)
        self.table = table
        self.health = health
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.selected: str = members[0]
        self.switches = 0
        self.last_switch: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._checking: set[str] = set()
        self._listening: dict[str, Outbound] = {}

    # -- members -----------------------------------------------------------------------------

    def _member(self, tag: str) -> Outbound | None:
        outbound = self.table.get(tag)
        if outbound is not None and self._listening.get(tag) is not outbound:
            old = self._listening.get(tag)
            if old is not None:
                old.remove_state_listener(self._on_member_state)
            outbound.add_state_listener(self._on_member_state)
            self._listening[tag] = outbound
        return outbound

    def follow_members(self) -> None:
        """Listen to the members' state changes (again after a reload replaced some)."""
        for tag in self.members:
            self._member(tag)

    def members_changed(self) -> None:
        """After a reload: follow replaced members, check those not checked yet."""
        self.follow_members()
        for tag in self.members:
            if self.health.get(tag).alive is None:
                self.request_check(tag)

    def usable(self, tag: str) -> bool:
        """The member may carry connections now (not known to be down)."""
        outbound = self._member(tag)
        if outbound is None:
            return False
        if isinstance(outbound, GroupOutbound):
            return any(outbound.usable(t) for t in outbound.members)
        state = getattr(outbound, "state", None)
        if isinstance(state, str) and state != "connected":
            return False
        return self.health.get(tag).alive is not False

    def delay(self, tag: str) -> float | None:
        outbound = self.table.get(tag)
        if isinstance(outbound, GroupOutbound):
            own = self.health.get(tag).delay_ms
            return own if own is not None else outbound.delay(outbound.selected)
        return self.health.get(tag).delay_ms

    def choose(self) -> str:
        """The member the group would use now (urltest/fallback rules; selector: the choice)."""
        return self.selected

    def reselect(self, reason: str) -> None:
        new = self.choose()
        if new != self.selected:
            old = self.selected
            self.selected = new
            self.switches += 1
            self.last_switch = f"{old} -> {new} ({reason})"
            logger.warning("group %s: switched %s -> %s (%s)", self.tag, old, new, reason)

    def _on_member_state(self, member: Outbound) -> None:
        tag = member.tag
        state = getattr(member, "state", None)
        if state == "connected":
            self.request_check(tag)  # back: measure it before preferring it again
        elif tag == self.selected:
            self.reselect(f"{tag}: {state}")

    def mark_down(self, tag: str, reason: str) -> None:
        """A connection through `tag` failed because of the member: skip it, check it soon."""
        self.health.failed(tag, reason)
        self.reselect(f"{tag}: {reason}")
        self.request_check(tag, RECHECK_AFTER)

    # -- checks ------------------------------------------------------------------------------

    def request_check(self, tag: str, after: float = 0.0) -> None:
        """Check one member soon (in the group's task group; once at a time per member)."""
        if self.url is None or self._tg is None or tag in self._checking:
            return
        self._checking.add(tag)
        self._tg.start_soon(self._check_later, tag, after, name=f"check {self.tag}/{tag}")

    async def _check_later(self, tag: str, after: float) -> None:
        try:
            if after:
                await anyio.sleep(after)
            await self.check_member(tag)
        finally:
            self._checking.discard(tag)

    async def check_member(self, tag: str, url: str | None = None) -> MemberHealth:
        """Run one check through `tag` now and record it."""
        outbound = self.table.get(tag)
        if outbound is None:  # not yet in the table (a reload is switching): checked after
            return self.health.get(tag)
        target = url or self.url
        if target is None:
            return self.health.get(tag)
        try:
            delay = await url_test(outbound, target, self.timeout)
        except (OutboundError, TimeoutError, OSError) as exc:
            was = self.health.get(tag).alive
            self.health.failed(tag, _reason(exc))
            if was is not False:
                logger.info("group %s: check of %s failed: %s", self.tag, tag, _reason(exc))
        else:
            self.health.succeeded(tag, delay)
        self.reselect(f"check of {tag}")
        return self.health.get(tag)

    async def check_all(self, url: str | None = None) -> dict[str, MemberHealth]:
        """Check every member at once; their results by tag."""
        async with anyio.create_task_group() as tg:
            for tag in self.members:
                tg.start_soon(self.check_member, tag, url)
        return {tag: self.health.get(tag) for tag in self.members}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.follow_members()
            task_status.started()
            try:
                if self.url is None:
                    await anyio.sleep_forever()
                while True:
                    await self.check_all()
                    await anyio.sleep(self.interval)
            finally:
                self._tg = None
                for outbound in self._listening.values():
                    outbound.remove_state_listener(self._on_member_state)
                self._listening.clear()

    # -- connections -------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        first = self.selected if self.usable(self.selected) else None
        if first is None:
            self.reselect(f"{self.selected} is down")
            first = self.selected
        rest = [t for t in self._ranked() if t != first]
        return [first, *rest] if self.failover else [first]

    def _ranked(self) -> list[str]:
        """Other members worth a retry, best first."""
        return [t for t in self.members if self.usable(t)]

    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        prefix = ctx.via
        tried: list[str] = []
        last: OutboundError | None = None
        for tag in self._candidates():
            if tag in tried:
                continue
            tried.append(tag)
            outbound = self._member(tag)
            if outbound is None:
                continue
            ctx.via = (
                (*prefix, self.tag)
                if isinstance(outbound, GroupOutbound)
                else (
                    *prefix,
                    self.tag,
                    tag,
                )
            )
            try:
                return await self._attempt(outbound, target, ctx)
            except MemberFailed as exc:
                last = exc
            except (GeneralFailure, ConnectTimeout) as exc:
                last = exc
                if isinstance(outbound, GroupOutbound):
                    raise
            if not self.failover:
                raise last
            logger.info(
                "group %s: %s through %s failed (%s); trying another member",
                self.tag,
                target,
                tag,
                last,
            )
            self.mark_down(tag, str(last))
        if last is None:
            raise GeneralFailure(f"group {self.tag}: no member can carry the connection")
        raise last

    async def _attempt(
        self, outbound: Outbound, target: Address, ctx: ConnContext
    ) -> anyio.abc.ByteStream:
        """`outbound.connect_tcp`, given up early (MemberFailed) when its server went silent."""
        tg = self._tg
        if tg is None or outbound.last_heard() is None or not self.failover:
            return await outbound.connect_tcp(target, ctx)
        pending = _Pending()
        asked = time.monotonic()
        tg.start_soon(self._run_pending, pending, outbound, target, ctx)
        rtt = outbound.round_trip() or 0.0
        patience = SILENCE_AFTER + SILENCE_RTTS * min(rtt, 1.0)
        try:
            while not pending.done.is_set():
                with anyio.move_on_after(min(patience, 0.25)):
                    await pending.done.wait()
                if pending.done.is_set():
                    break
                heard = outbound.last_heard()
                waited = time.monotonic() - asked
                if waited >= patience and (heard is None or heard < asked):
                    pending.abandoned = True
                    raise MemberFailed(f"no answer from the server for {waited:.1f} s")
        except BaseException:
            pending.abandoned = True
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.stream is not None
        return pending.stream

    async def _run_pending(
        self, pending: _Pending, outbound: Outbound, target: Address, ctx: ConnContext
    ) -> None:
        try:
            pending.stream = await outbound.connect_tcp(target, ctx)
        except OutboundError as exc:
            pending.error = exc
        except Exception as exc:  # a member's bug must not end the group's task group
            logger.exception("group %s: connect through %s failed", self.tag, outbound.tag)
            pending.error = GeneralFailure(f"{type(exc).__name__}: {exc}")
        finally:
            pending.done.set()
            if pending.abandoned and pending.stream is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(pending.stream)

    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        tag = self._candidates()[0]
        outbound = self._member(tag)
        if outbound is None:
            raise GeneralFailure(f"group {self.tag}: member {tag!r} does not exist")
        ctx.via = (
            (*ctx.via, self.tag)
            if isinstance(outbound, GroupOutbound)
            else (
                *ctx.via,
                self.tag,
                tag,
            )
        )
        return await outbound.open_udp(ctx)

    # -- status ------------------------------------------------------------------------------

    def chain(self) -> list[str]:
        """The member in use, through nested groups: `["inner", "proxy-b"]`."""
        outbound = self.table.get(self.selected)
        if isinstance(outbound, GroupOutbound):
            return [self.selected, *outbound.chain()]
        return [self.selected]

    def status(self) -> GroupReport:
        members = []
        for tag in self.members:
            outbound = self.table.get(tag)
            entry = self.health.get(tag)
            delay_ms = entry.delay_ms
            if isinstance(outbound, GroupOutbound) and delay_ms is None:
                delay_ms = outbound.delay(outbound.selected)
            members.append(
                MemberReport(
                    tag=tag,
                    type=outbound.type if outbound is not None else "missing",
                    state=outbound.status().state if outbound is not None else "missing",
                    usable=self.usable(tag),
                    delay_ms=None if delay_ms is None else round(delay_ms, 1),
                    error=entry.error,
                    checked_at=entry.checked_at,
                    alive=entry.alive,
                )
            )
        return GroupReport(
            tag=self.tag,
            type=self.type,
            state="ready" if any(m.usable for m in members) else "down",
            selected=self.selected,
            chain=tuple(self.chain()),
            url=self.url,
            switches=self.switches,
            last_switch=self.last_switch,
            members=tuple(members),
        )


class SelectorOutbound(GroupOutbound):
    type = "selector"

    def __init__(
        self,
        tag: str,
        members: list[str],
        table: Mapping[str, Outbound],
        health: HealthBook,
        *,
        default: str | None = None,
        store: SelectionStore | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(tag, members, table, health, url=url)
        self.store = store
        saved = store.get(tag) if store is not None else None
        if saved is not None and saved not in members:
            logger.warning(
                "selector %s: the saved choice %r is no longer a member; using %r",
                tag,
                saved,
                default or members[0],
            )
            saved = None
        self.selected = saved or default or members[0]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.url = None  # a selector checks only when asked (`ctl delay`)
        await super().run(task_status=task_status)

    def select(self, member: str) -> None:
        """Use `member` from now on (new connections); kept across restarts."""
        if member not in self.members:
            raise ValueError(
                f"{member!r} is not a member of {self.tag} ({', '.join(self.members)})"
            )
        if member != self.selected:
            logger.info("selector %s: %s -> %s (chosen)", self.tag, self.selected, member)
            self.selected = member
            self.switches += 1
            self.last_switch = f"-> {member} (chosen)"
        if self.store is not None:
            self.store.set(self.tag, member)


class UrlTestOutbound(GroupOutbound):
    type = "urltest"
    failover = True

    def __init__(
        self,
        tag: str,
        members: list[str],
        table: Mapping[str, Outbound],
        health: HealthBook,
        *,
        url: str,
        interval: float = 180.0,
        timeout: float = 5.0,
        tolerance: float = 50.0,
    ) -> None:
        super().__init__(tag, members, table, health, url=url, interval=interval, timeout=timeout)
        self.tolerance = tolerance

    def _ranked(self) -> list[str]:
        usable = [t for t in self.members if self.usable(t)]
        return sorted(usable, key=lambda t: _or_inf(self.delay(t)))

    def choose(self) -> str:
        ranked = self._ranked()
        if not ranked:
            return self.selected
        best = ranked[0]
        current = self.selected
        if current not in ranked:
            return best
        current_delay, best_delay = self.delay(current), self.delay(best)
        if current_delay is None:
            return best if best_delay is not None else current
        if best_delay is not None and best_delay + self.tolerance < current_delay:
            return best
        return current


class FallbackOutbound(GroupOutbound):
    type = "fallback"
    failover = True

    def choose(self) -> str:
        for tag in self.members:
            if self.usable(tag):
                return tag
        return self.selected


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


# --------------------------------------------------------------------------------------------
# factories


def _table(ctx: OutboundContext) -> tuple[Mapping[str, Outbound], HealthBook]:
    table = ctx.table if ctx.table is not None else {}
    health = ctx.health if ctx.health is not None else HealthBook()
    return table, health


def _selector(cfg: SelectorOutboundConfig, ctx: OutboundContext) -> Outbound:
    table, health = _table(ctx)
    return SelectorOutbound(
        cfg.tag, list(cfg.outbounds), table, health, default=cfg.default, store=ctx.selections
    )


def _urltest(cfg: UrlTestOutboundConfig, ctx: OutboundContext) -> Outbound:
    table, health = _table(ctx)
    return UrlTestOutbound(
        cfg.tag,
        list(cfg.outbounds),
        table,
        health,
        url=cfg.url,
        interval=cfg.interval,
        timeout=cfg.timeout,
        tolerance=cfg.tolerance,
    )


def _fallback(cfg: FallbackOutboundConfig, ctx: OutboundContext) -> Outbound:
    table, health = _table(ctx)
    return FallbackOutbound(
        cfg.tag,
        list(cfg.outbounds),
        table,
        health,
        url=cfg.url,
        interval=cfg.interval,
        timeout=cfg.timeout,
    )


register_outbound("selector", _selector)
register_outbound("urltest", _urltest)
register_outbound("fallback", _fallback)
