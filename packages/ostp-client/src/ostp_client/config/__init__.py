"""The daemon's user-facing configuration.

`load_config(path)` / `parse_config_text(text)` accept the native format (inbounds, outbounds,
routing; JSON with `//` comments) and upstream's flat client config (spec §10.10), which is
converted. Every problem is reported as a `ConfigError` whose `issues` name the field by its
JSON path (`outbounds[0].server`) and say what is wrong.

- `models`: the pydantic models, one per section of the file;
- `issues`: `ConfigError`, readable messages, and the checks that span the file;
- `loading`: text/file to a validated `ClientConfig`, and back;
- `flat`: upstream's flat format (spec §10.10) converted to the native one;
- `share_link`: `ostp://` links (spec §10.9) to an outbound or a whole config.

This module re-exports the public names, so callers write `from ostp_client.config import ...`.
"""

from __future__ import annotations

from ostp_client.config.flat import convert_flat_config, is_flat_config
from ostp_client.config.issues import ConfigError, ConfigIssue
from ostp_client.config.loading import (
    config_from_data,
    config_json_schema,
    dump_config,
    load_config,
    parse_config_text,
    strip_json_comments,
)
from ostp_client.config.models import (
    DEFAULT_TEST_URL,
    DESTINATION_PORT_CONDITIONS,
    GROUP_TYPES,
    REALITY_DEFAULT_SNI,
    SOURCE_PORT_CONDITIONS,
    BlockOutboundConfig,
    ClientConfig,
    ControlConfig,
    DirectOutboundConfig,
    FallbackOutboundConfig,
    HeadlessLogicalRule,
    HeadlessRule,
    HeadlessRuleConfig,
    InboundConfig,
    LocalProxyInboundConfig,
    LogConfig,
    LogicalRoutingRule,
    MetricsConfig,
    MuxConfig,
    NatConfig,
    NatTurnConfig,
    OstpOutboundConfig,
    OutboundConfig,
    RealityConfig,
    RouteRuleConfig,
    RoutingConfig,
    RoutingRule,
    RuleSetConfig,
    SelectorOutboundConfig,
    TunInboundConfig,
    UrlTestOutboundConfig,
    UserConfig,
    parse_port_range,
    validate_test_url,
)
from ostp_client.config.share_link import (
    ShareLink,
    config_from_share_link,
    ostp_outbound_from_share_link,
    parse_share_link,
)

__all__ = [
    "DEFAULT_TEST_URL",
    "DESTINATION_PORT_CONDITIONS",
    "GROUP_TYPES",
    "REALITY_DEFAULT_SNI",
    "SOURCE_PORT_CONDITIONS",
    "BlockOutboundConfig",
    "ClientConfig",
    "ConfigError",
    "ConfigIssue",
    "ControlConfig",
    "DirectOutboundConfig",
    "FallbackOutboundConfig",
    "HeadlessLogicalRule",
    "HeadlessRule",
    "HeadlessRuleConfig",
    "InboundConfig",
    "LocalProxyInboundConfig",
    "LogConfig",
    "LogicalRoutingRule",
    "MetricsConfig",
    "MuxConfig",
    "NatConfig",
    "NatTurnConfig",
    "OstpOutboundConfig",
    "OutboundConfig",
    "RealityConfig",
    "RouteRuleConfig",
    "RoutingConfig",
    "RoutingRule",
    "RuleSetConfig",
    "SelectorOutboundConfig",
    "ShareLink",
    "TunInboundConfig",
    "UrlTestOutboundConfig",
    "UserConfig",
    "config_from_data",
    "config_from_share_link",
    "config_json_schema",
    "convert_flat_config",
    "dump_config",
    "is_flat_config",
    "load_config",
    "ostp_outbound_from_share_link",
    "parse_config_text",
    "parse_port_range",
    "parse_share_link",
    "strip_json_comments",
    "validate_test_url",
]
