"""Reload planning: what applying a new config to a running daemon will change.

`plan_reload` compares the new config with the running one part by part (see
`ostp_client.daemon` for the rules) and builds the new parts without starting them; the daemon
then starts them, switches over and stops what left. `ReloadError` and `ReloadOutcome` are what
the control socket and SIGHUP report. Kept apart from `daemon` so the control server can name
them without importing the daemon (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ostp_client.config import (
    ClientConfig,
    LocalProxyInboundConfig,
    OstpOutboundConfig,
    TunInboundConfig,
)
from ostp_client.connections import Dispatcher
from ostp_client.errors import OstpClientError
from ostp_client.inbounds import Inbound, build_inbound
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound
from ostp_client.outbounds import Outbound, OutboundContext, OutboundError, build_outbound
from ostp_client.router import Router, RoutingError

__all__ = [
    "ReloadError",
    "ReloadOutcome",
    "ReloadPlan",
    "claim",
    "held",
    "outbound_identity",
    "plan_reload",
]


class ReloadError(OstpClientError):
    """A new config could not be applied; nothing changed (the message says why)."""


@dataclass(slots=True)
class ReloadOutcome:
    """What `Daemon.reload` did."""

    applied: list[str] = field(default_factory=list)
    """Config sections that changed and took effect: routing, log.level, outbounds, ..."""
    needs_restart: list[str] = field(default_factory=list)
    """Changed sections that take effect after a restart only."""
    changes: list[str] = field(default_factory=list)
    """One line per change, for the log and the control reply."""


@dataclass(slots=True)
class ReloadPlan:
    """What a reload will do, built before anything changes."""

    router: Router
    outbounds: dict[str, Outbound] = field(default_factory=dict)
    """The new table in config order: running objects where unchanged, new ones elsewhere."""
    inbounds: dict[str, Inbound] = field(default_factory=dict)
    fresh_outbounds: list[Outbound] = field(default_factory=list)
    fresh_inbounds: list[Inbound] = field(default_factory=list)
    updates: list[tuple[LocalProxyInbound, LocalProxyInbound]] = field(default_factory=list)
    """(running inbound, one built from its new config): settings move over, listener stays."""
    leaving: list[Inbound] = field(default_factory=list)
    """Running inbounds that stop (removed, or replaced by one in `fresh_inbounds`)."""
    stop_first: list[Inbound] = field(default_factory=list)
    """Of `leaving`: those holding a port or the TUN that a fresh inbound needs."""


def outbound_identity(config: ClientConfig, tag: str) -> object:
    """What an outbound is built from: its block, and for ostp the `mux` that applies."""
    for item in config.outbounds:
        if item.tag == tag:
            if isinstance(item, OstpOutboundConfig):
                return (item, config.mux_for(item))
            return (item, None)
    return None


def claim(config: Any) -> object:
    """What a new inbound will hold exclusively: a TCP port, or the TUN (device, table, mark)."""
    if isinstance(config, LocalProxyInboundConfig):
        return ("tcp", config.port) if config.port else None
    if isinstance(config, TunInboundConfig):
        return ("tun",)
    return None


def held(inbound: Inbound) -> set[object]:
    """What a running inbound holds (the ports it is bound to, also when configured as 0)."""
    if isinstance(inbound, LocalProxyInbound):
        return {("tcp", address.port) for address in inbound.addresses}
    if inbound.type == "tun":
        return {("tun",)}
    return set()


def plan_reload(
    old: ClientConfig,
    new: ClientConfig,
    *,
    router: Router,
    make_router: Callable[[ClientConfig], Router],
    outbounds: Mapping[str, Outbound],
    inbounds: Mapping[str, Inbound],
    context: OutboundContext,
    dispatcher: Dispatcher,
) -> ReloadPlan:
    """Validate `new` against the running parts and build what is new; nothing runs yet.

    `router`, `outbounds` and `inbounds` are the running ones; `make_router` builds a router
    for a config and `context`/`dispatcher` are what new outbounds/inbounds are built with.
    Raises `ReloadError` (then whatever was built is dropped: nothing has started).
    """
    if new.routing == old.routing and (not new.routing.rule_set or new.base_dir == old.base_dir):
        # nothing to change: keep the running router and its hit counters, but re-read
        # rule-set files that changed
        router.refresh_rule_sets()
    else:
        try:
            router = make_router(new)
        except RoutingError as exc:
            raise ReloadError(str(exc)) from None
    plan = ReloadPlan(router)
    for item in new.outbounds:
        current = outbounds.get(item.tag)
        if current is not None and outbound_identity(old, item.tag) == outbound_identity(
            new, item.tag
        ):
            plan.outbounds[item.tag] = current
            continue
        try:
            outbound = build_outbound(item, context)
        except (LookupError, ValueError, OSError, OutboundError) as exc:
            raise ReloadError(f"outbound {item.tag!r}: {exc}") from None
        plan.outbounds[item.tag] = outbound
        plan.fresh_outbounds.append(outbound)

    before = {entry.tag: entry for entry in old.inbounds}
    for entry in new.inbounds:
        running = inbounds.get(entry.tag)
        previous = before.get(entry.tag)
        if running is not None and previous == entry:
            plan.inbounds[entry.tag] = running
            continue
        if (
            isinstance(running, LocalProxyInbound)
            and isinstance(previous, LocalProxyInboundConfig)
            and isinstance(entry, LocalProxyInboundConfig)
            and (previous.listen, previous.port) == (entry.listen, entry.port)
        ):
            # Same address: keep the listener and its connections, take the new settings.
            plan.updates.append((running, LocalProxyInbound(entry, dispatcher)))
            plan.inbounds[entry.tag] = running
            continue
        try:
            inbound = build_inbound(entry, dispatcher)
        except (LookupError, ValueError, OSError) as exc:
            raise ReloadError(f"inbound {entry.tag!r}: {exc}") from None
        plan.inbounds[entry.tag] = inbound
        plan.fresh_inbounds.append(inbound)

    plan.leaving = [i for tag, i in inbounds.items() if plan.inbounds.get(tag) is not i]
    fresh_tags = {i.tag for i in plan.fresh_inbounds}
    claims = {claim(entry) for entry in new.inbounds if entry.tag in fresh_tags} - {None}
    plan.stop_first = [i for i in plan.leaving if held(i) & claims]
    return plan
