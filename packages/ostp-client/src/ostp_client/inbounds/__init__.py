"""Inbounds and the factory registry that builds them from config.

`INBOUND_FACTORIES` maps a config `type` to `(config, dispatcher) -> Inbound`; a module adding a
type (e.g. `tun`) calls `register_inbound()` at import and is listed in
`OPTIONAL_INBOUND_MODULES`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from ostp_client.config import LocalProxyInboundConfig
from ostp_client.connections import Dispatcher
from ostp_client.inbounds.base import Inbound, ProxySettings
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound

__all__ = [
    "INBOUND_FACTORIES",
    "Inbound",
    "InboundFactory",
    "LocalProxyInbound",
    "ProxySettings",
    "build_inbound",
    "register_inbound",
]

logger = logging.getLogger(__name__)

InboundFactory = Callable[[Any, Dispatcher], Inbound]
INBOUND_FACTORIES: dict[str, InboundFactory] = {}
OPTIONAL_INBOUND_MODULES = ("ostp_client.inbounds.tun.inbound",)
# Which optional module provides a type: imported only when a config uses it, so a proxy-only
# daemon does not load the netstack (idle memory).
OPTIONAL_INBOUND_TYPES = {"tun": "ostp_client.inbounds.tun.inbound"}


def register_inbound(type_name: str, factory: InboundFactory) -> None:
    INBOUND_FACTORIES[type_name] = factory


def _local_proxy(config: LocalProxyInboundConfig, dispatcher: Dispatcher) -> Inbound:
    return LocalProxyInbound(config, dispatcher)


register_inbound("local_proxy", _local_proxy)


def load_optional_inbounds(type_name: str | None = None) -> None:
    """Import the optional inbound modules (only the one for ``type_name`` when given)."""
    names: tuple[str, ...] = OPTIONAL_INBOUND_MODULES
    if type_name is not None:
        module = OPTIONAL_INBOUND_TYPES.get(type_name)
        names = (module,) if module is not None else ()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            logger.debug("optional inbound module %s not available", name)


def build_inbound(config: Any, dispatcher: Dispatcher) -> Inbound:
    if config.type not in INBOUND_FACTORIES:
        load_optional_inbounds(config.type)
    factory = INBOUND_FACTORIES.get(config.type)
    if factory is None:
        raise LookupError(f"inbound type {config.type!r} is not available in this build")
    return factory(config, dispatcher)
