"""Outbounds and the factory registry that builds them from config.

`OUTBOUND_FACTORIES` maps a config `type` to a factory `(config, context) -> Outbound`.
`direct` and `block` are registered here; `ostp` is registered by `ostp_client.outbounds.ostp`
when that module is importable (it calls `register_outbound("ostp", factory)` at import), and
the groups (`selector`, `urltest`, `fallback`) by `ostp_client.outbounds.group`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ostp_client.config import (
    BlockOutboundConfig,
    ClientConfig,
    DirectOutboundConfig,
)
from ostp_client.flow import (
    Address,
    Blocked,
    ConnContext,
    ConnectionRefused,
    ConnectTimeout,
    GeneralFailure,
    HostUnreachable,
    NetworkUnreachable,
    Outbound,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.outbounds.block import BlockOutbound
from ostp_client.outbounds.direct import DirectOutbound

if TYPE_CHECKING:
    from ostp_client.outbounds.group import HealthBook, SelectionStore

__all__ = [
    "OUTBOUND_FACTORIES",
    "Address",
    "Blocked",
    "ConnContext",
    "ConnectTimeout",
    "ConnectionRefused",
    "GeneralFailure",
    "HostUnreachable",
    "NetworkUnreachable",
    "Outbound",
    "OutboundContext",
    "OutboundError",
    "OutboundFactory",
    "UdpOutboundSession",
    "build_outbound",
    "register_outbound",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboundContext:
    """What a factory may need besides its own config block."""

    config: ClientConfig
    """The whole config (e.g. for `config.mux_for(outbound_config)`)."""
    table: Mapping[str, Outbound] | None = None
    """The daemon's live outbounds by tag (groups look their members up here)."""
    health: HealthBook | None = None
    """Check results shared by the groups."""
    selections: SelectionStore | None = None
    """Where selector groups keep the user's choice."""


OutboundFactory = Callable[[Any, OutboundContext], Outbound]
"""`(outbound config model, context) -> Outbound`."""

OUTBOUND_FACTORIES: dict[str, OutboundFactory] = {}

# Modules that register more outbound types when imported; missing ones are skipped.
OPTIONAL_OUTBOUND_MODULES = ("ostp_client.outbounds.ostp", "ostp_client.outbounds.group")


def register_outbound(type_name: str, factory: OutboundFactory) -> None:
    OUTBOUND_FACTORIES[type_name] = factory


def _direct(config: DirectOutboundConfig, _: OutboundContext) -> Outbound:
    return DirectOutbound.from_config(config)


def _block(config: BlockOutboundConfig, _: OutboundContext) -> Outbound:
    return BlockOutbound.from_config(config)


register_outbound("direct", _direct)
register_outbound("block", _block)


def load_optional_outbounds() -> None:
    for name in OPTIONAL_OUTBOUND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if exc.name != name:  # the module exists but one of its imports failed
                raise
            logger.debug("optional outbound module %s not available", name)


class UnavailableOutboundType(GeneralFailure):
    pass


def build_outbound(config: Any, context: OutboundContext) -> Outbound:
    """Build the outbound for one `outbounds[]` entry through the registry."""
    load_optional_outbounds()
    factory = OUTBOUND_FACTORIES.get(config.type)
    if factory is None:
        raise UnavailableOutboundType(
            f"outbound type {config.type!r} ({config.tag!r}) is not available in this build"
        )
    return factory(config, context)
