"""The daemon's user-facing configuration: pydantic models, loading, conversion, share links.

`load_config(path)` / `parse_config_text(text)` accept the native format (inbounds, outbounds,
routing; JSON with `//` comments) and upstream's flat client config (spec §10.10), which is
converted. Every problem is reported as a `ConfigError` whose `issues` name the field by its
JSON path (`outbounds[0].server`) and say what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    SerializationInfo,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

__all__ = [
    "GROUP_TYPES",
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
    "TunInboundConfig",
    "UrlTestOutboundConfig",
    "UserConfig",
    "config_from_share_link",
    "config_json_schema",
    "convert_flat_config",
    "dump_config",
    "is_flat_config",
    "load_config",
    "ostp_outbound_from_share_link",
    "parse_config_text",
    "parse_host_port",
    "strip_json_comments",
]

DEFAULT_PROXY_PORT = 1088  # spec §10.10 socks5_bind default 127.0.0.1:1088
DEFAULT_MTU = 65535
"""Ceiling of path MTU discovery: on loopback datagrams grow to 64 KB, on a real path the
first hop's MTU caps them (upstream's CLI default, 1350, fixed the datagram size; spec §10.10)."""
DEFAULT_KEEPALIVE = 5.0  # spec §10.2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# host:port text


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port`, `[v6]:port` or (with `default_port`) a bare host; raise ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if not rest:
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"unexpected {rest!r} after ']'")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port") from None
        host, port_text = text, None
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


# --------------------------------------------------------------------------------------------
# models


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the daemon."""
    output: Annotated[str, Field(min_length=1)] = "stderr"
    """`stderr`, or the path of a log file (its directory must exist)."""
    format: Literal["text", "json"] = "text"
    """`text` lines, or `json`: one object per line with ts, level, logger and message."""
    max_bytes: Annotated[int, Field(ge=0)] = 10 << 20
    """A log file is rotated when it would grow past this size; 0 never rotates (for
    logrotate: the file is reopened when it is moved away)."""
    backups: Annotated[int, Field(ge=0, le=100)] = 5
    """Rotated files kept (`file.1` ... `file.N`)."""


class MetricsConfig(_Model):
    """A Prometheus endpoint (`GET /metrics`) with the daemon's counters."""

    listen: str = "127.0.0.1:9099"
    """`host:port` of the HTTP endpoint; loopback by default (the data is not secret but
    shows what the machine connects to)."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, _port = parse_host_port(value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("listen on an IP address such as 127.0.0.1 or [::1]") from None
        return value.strip()

    @property
    def address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class UserConfig(_Model):
    """One username/password pair accepted by a proxy inbound (RFC 1929, HTTP Basic)."""

    username: Annotated[str, Field(min_length=1, max_length=255)]
    password: Annotated[SecretStr, Field(min_length=1, max_length=255)]

    @field_serializer("password", when_used="always")
    def _reveal(self, value: SecretStr, info: SerializationInfo) -> str:
        return _secret_out(value, info)


class LocalProxyInboundConfig(_Model):
    """One TCP port speaking SOCKS5 and HTTP proxy (first byte 0x05 → SOCKS5), spec §10.4."""

    type: Literal["local_proxy"] = "local_proxy"
    tag: Annotated[str, Field(min_length=1)] = "proxy-in"
    listen: str = "127.0.0.1"
    """Address to listen on; loopback by default (a wildcard is the user's explicit choice)."""
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PROXY_PORT
    """TCP port (and the UDP ASSOCIATE relay's address); 0 picks a free port."""
    users: list[UserConfig] = Field(default_factory=list)
    """When non-empty, every client must authenticate as one of these users."""
    set_system_proxy: bool = False
    """Point the desktop's proxy settings at this inbound while the daemon runs."""
    udp: bool = True
    """Accept SOCKS5 UDP ASSOCIATE."""
    handshake_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds a client has to finish the SOCKS5/HTTP request before it is dropped."""

    @field_validator("users")
    @classmethod
    def _check_users(cls, value: list[UserConfig]) -> list[UserConfig]:
        first: dict[str, int] = {}
        duplicates = []
        for index, user in enumerate(value):
            seen = first.setdefault(user.username, index)
            if seen != index:
                duplicates.append(f"users[{index}] repeats users[{seen}] ({user.username!r})")
        if duplicates:
            raise ValueError(f"duplicate username: {'; '.join(duplicates)}")
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        value = value.strip()
        if value not in ("localhost", ""):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError("expected an IP address such as 127.0.0.1 or ::1") from None
        return value or "127.0.0.1"


_TUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1 on Linux


def _mark_from_text(value: Any) -> Any:
    """A routing mark may be written as a number or as text such as ``"0x2022"``."""
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f'{value!r} is not a number (e.g. 8226 or "0x2022")') from None
    return value


# List items are checked one by one (Annotated item types), so that every bad item of a list
# is reported with its own index (`routing.rules[0].ip_cidr[2]`), not just the first one.


def _cidr_item(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return value


def _interface_item(value: str) -> str:
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an address with a prefix length") from None
    return value


def _stun_item(value: str) -> str:
    parse_host_port(value, STUN_PORT)
    return value.strip()


def _regex_item(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return value


def _port_range_item(value: str) -> str:
    parse_port_range(value)
    return value


CidrText = Annotated[str, AfterValidator(_cidr_item)]
InterfaceText = Annotated[str, AfterValidator(_interface_item)]


class TunInboundConfig(_Model):
    """A TUN device whose IP packets a user-space TCP/IP stack turns into routed connections."""

    type: Literal["tun"] = "tun"
    tag: Annotated[str, Field(min_length=1)] = "tun-in"
    name: str = "ostp0"
    """Interface name (at most 15 characters on Linux)."""
    mtu: Annotated[int, Field(ge=1280, le=65535)] = 9000
    """MTU of the device; larger means fewer packets (and less CPU) per byte."""
    address: list[InterfaceText] = Field(
        default_factory=lambda: ["198.18.0.1/30", "fdfe:dcba:9876::1/126"]
    )
    """Addresses of the device with their prefix length (IPv4 and/or IPv6)."""
    auto_route: bool = True
    """Route all traffic through the device while the daemon runs (removed on exit), by policy
    routing on Linux: default routes 0.0.0.0/0 and ::/0 into the device in table `route_table`,
    and rules that send every packet without `routing_mark` there, while the main table's
    more specific routes (LAN) still apply. The daemon's own sockets carry the mark and keep
    the main table's default routes. Rules left by a crashed run are removed at start. The
    OSTP servers and `exclude_routes` are `throw` routes in that table (they keep the main
    table's route)."""
    route_table: Annotated[int, Field(ge=1, le=0xFFFFFFFF)] = 2022
    """Linux routing table for `auto_route`; it must be dedicated to this daemon (it is
    flushed at start and exit). 253-255 (default, main, local) are refused."""
    routing_mark: Annotated[int, Field(ge=1, le=0xFFFFFFFF)] = 0x2022
    """Linux `SO_MARK` put on the daemon's outgoing sockets while `auto_route` is active, so
    that they bypass the TUN (needs CAP_NET_ADMIN, as the TUN itself does)."""
    exclude_routes: list[CidrText] = Field(default_factory=list)
    """CIDRs that keep their main-table route (LAN, a second VPN)."""
    dns_hijack: bool = True
    """Answer every query to port 53 that enters the device through the tunnel."""
    dns_upstream: str | None = None
    """`host:port` the hijacked queries go to (through the routed outbound); when absent, each
    query goes to the address it was sent to."""
    fake_ip: bool = False
    """Answer A/AAAA queries with addresses from `fake_ip_range`/`fake_ip6_range` and connect
    by name, so that domain rules apply to TUN traffic."""
    fake_ip_range: str = "198.18.0.0/15"
    """IPv4 range for fake-IP answers (the device's own addresses are left out)."""
    fake_ip6_range: str | None = "fc00::/18"
    """IPv6 range for fake-IP AAAA answers; none answers AAAA queries with no address."""
    offload: bool = True
    """Linux: checksum and segmentation offload with the kernel (`IFF_VNET_HDR`)."""
    udp_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds a UDP flow may be idle before it is closed."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _TUN_NAME.match(value):
            raise ValueError("expected 1-15 letters, digits, '_', '.' or '-'")
        return value

    _routing_mark_text = field_validator("routing_mark", mode="before")(_mark_from_text)

    @field_validator("route_table")
    @classmethod
    def _check_table(cls, value: int) -> int:
        if value in (253, 254, 255):
            raise ValueError("253, 254 and 255 are the system's default, main and local tables")
        return value

    @field_validator("fake_ip_range", "fake_ip6_range")
    @classmethod
    def _check_fake_range(cls, value: str | None) -> str | None:
        if value is not None:
            net = ipaddress.ip_network(value, strict=False) if _is_net(value) else None
            if net is None or net.num_addresses < 16:
                raise ValueError(f"{value!r} is not a CIDR range of at least 16 addresses")
        return value

    @field_validator("dns_upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value, 53)
        return value


def _is_net(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


InboundConfig = Annotated[LocalProxyInboundConfig | TunInboundConfig, Field(discriminator="type")]
"""Discriminated union of inbound types."""


class MuxConfig(_Model):
    enabled: bool = False
    """Spread streams over several OSTP sessions to one server (spec §10.3)."""
    sessions: Annotated[int, Field(ge=1, le=64)] = 1
    """Number of sessions when enabled."""


STUN_PORT = 3478  # RFC 8489 §18.6: the default port of STUN and TURN over UDP


class NatTurnConfig(_Model):
    """A TURN server (RFC 8656, over UDP) and its long-term credentials (RFC 8489 §9.2)."""

    server: str
    """`host:port` of the TURN server (port 3478 when omitted)."""
    username: Annotated[str, Field(min_length=1, max_length=508)]  # RFC 8489 §14.3
    password: Annotated[SecretStr, Field(min_length=1)]
    """Long-term credential password; never logged."""
    lifetime: Annotated[int, Field(ge=60, le=86400)] | None = None
    """Allocation LIFETIME to ask for, seconds; absent lets the server choose (600)."""
    refresh_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.8
    """Refresh the allocation when this fraction of its granted lifetime has passed."""
    permission_refresh: Annotated[float, Field(gt=0, lt=300)] = 240.0
    """Seconds between permission refreshes (permissions expire after 300 s, RFC 8656 §9)."""
    channel_refresh: Annotated[float, Field(gt=0, lt=600)] = 480.0
    """Seconds between channel refreshes (channels expire after 600 s, RFC 8656 §12)."""

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        parse_host_port(value, STUN_PORT)
        return value.strip()

    @field_serializer("password", when_used="always")
    def _reveal(self, value: SecretStr, info: SerializationInfo) -> str:
        return _secret_out(value, info)

    @property
    def server_address(self) -> tuple[str, int]:
        return parse_host_port(self.server, STUN_PORT)


class NatConfig(_Model):
    """NAT traversal of an ostp outbound: STUN discovery and TURN relaying, each on the
    session's own UDP socket.

    `mode` is `direct` (never relay), `turn` (always relay through `turn`) or `auto` (direct
    first; relay when the handshake gets no answer). When `mode` is omitted it is `auto` if a
    `turn` server is given and `direct` otherwise.
    """

    mode: Literal["direct", "turn", "auto"] = "direct"
    stun: list[Annotated[str, AfterValidator(_stun_item)]] = Field(default_factory=list)
    """STUN servers (`host:port`, port 3478 when omitted) asked for the mapped address at the
    start of every session."""
    turn: NatTurnConfig | None = None
    retry_direct_after: Annotated[float, Field(ge=0, le=86400)] = 600.0
    """`auto`: seconds after falling back to TURN before a new session tries direct again."""

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "mode" not in data and data.get("turn") is not None:
            return {**data, "mode": "auto"}
        return data

    @field_validator("stun", mode="before")
    @classmethod
    def _stun_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_mode(self) -> NatConfig:
        if self.mode != "direct" and self.turn is None:
            raise ValueError(f"mode {self.mode!r} needs a `turn` server")
        return self

    @property
    def stun_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(text, STUN_PORT) for text in self.stun]


_HOST_TEXT = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")
_SERVER_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
REALITY_DEFAULT_SNI = "www.microsoft.com"  # spec §10.6: upstream's client default


def _base64url_key(value: str) -> str:
    """A 32-byte X25519 key as base64url (padding optional), as upstream writes ``pbk``."""
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        raise ValueError("not base64url (A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if len(raw) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, this one is {len(raw)}")
    return text


class RealityConfig(_Model):
    """Reality on the TCP transports (spec §10.6): the stream looks like TLS 1.3 to `server_name`;
    only a server holding the private key of `public_key` answers as OSTP."""

    public_key: Annotated[str, AfterValidator(_base64url_key)]
    """The server's X25519 public key, base64url (upstream's `pbk`)."""
    short_id: str
    """16 hex characters (upstream's `sid`)."""
    server_name: str | None = None
    """SNI of the ClientHello; one of the server's `server_names`. Default: the outbound's `sni`,
    else `www.microsoft.com` (as upstream)."""

    @field_validator("short_id")
    @classmethod
    def _check_short_id(cls, value: str) -> str:
        text = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{16}", text):
            raise ValueError("the short id is 16 hex characters")
        return text

    @field_validator("server_name")
    @classmethod
    def _check_server_name(cls, value: str | None) -> str | None:
        if value is not None and not _SERVER_NAME.fullmatch(value):
            raise ValueError("a host name of letters, digits, '.', '-' and '_'")
        return value

    @property
    def public_key_bytes(self) -> bytes:
        text = self.public_key
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class OstpOutboundConfig(_Model):
    """A pool of OSTP sessions to one server."""

    type: Literal["ostp"] = "ostp"
    tag: Annotated[str, Field(min_length=1)] = "proxy"
    server: str
    """`host:port` of the OSTP server."""
    access_key: SecretStr
    """The shared access key; never logged."""
    mtu: Annotated[int, Field(ge=576, le=65535)] = DEFAULT_MTU
    """Largest path MTU probed: data datagrams grow up to `mtu - 48` bytes as path MTU
    discovery finds the path carries them (and never beyond the first hop's MTU)."""
    mux: MuxConfig | None = None
    """Sessions to the server; when absent, the top-level `mux` applies."""
    keepalive_interval: Annotated[float, Field(gt=0, le=3600)] = DEFAULT_KEEPALIVE
    """Seconds between keepalive Ping/KeepAlive (spec §10.2)."""
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    """Seconds to wait for the server to confirm a stream (spec §10.4)."""
    idle_timeout: Annotated[float, Field(ge=1, le=3600)] = 25.0
    """Seconds without a valid datagram before a session is re-established (spec §10.2)."""
    reconnect_delay: Annotated[float, Field(ge=0, le=300)] = 5.0
    """Fixed back-off before a stopped session is started again (spec §10.2)."""
    nat: NatConfig | None = None
    """NAT traversal (STUN discovery, TURN relaying); absent: plain direct UDP."""
    extensions: bool = True
    """Offer ostp-py's protocol extension (per-stream flow control) to the server; an
    upstream server ignores the offer (docs/flow-control.md)."""
    stream_window: Annotated[int, Field(ge=64 * 1024, le=16 * 1024 * 1024)] = 256 * 1024
    """Initial receive window per stream (bytes) with an ostp-py server; grows for fast readers."""
    receive_buffer_cap: Annotated[int, Field(ge=1024 * 1024, le=1024 * 1024 * 1024)] = (
        64 * 1024 * 1024
    )
    """Bytes all streams of a session may buffer for slow local readers before the session
    refuses Data (it is sent again later). Matters with upstream servers, which have no flow
    control and give up on frames refused for about 1.5 s."""
    socket_buffer: Annotated[int, Field(ge=64 * 1024, le=1024 * 1024 * 1024)] = 32 * 1024 * 1024
    """SO_RCVBUF/SO_SNDBUF asked for on each session's UDP socket (upstream asks for 32 MiB).
    Without CAP_NET_ADMIN the kernel caps it at `net.core.rmem_max`/`wmem_max` (the daemon
    warns once); `ctl status` shows what was granted."""
    transport: Literal["udp", "tcp", "wss", "auto"] = "udp"
    """How the datagrams reach the server (spec §10.6): `udp`; `tcp` (xHTTP `/stream`, UDP over
    TCP); `wss` (WebSocket `/wss`); `auto` (UDP, and TCP while UDP does not pass). `tcp` and
    `wss` run inside Reality when `reality` is set."""
    transport_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """TCP port of `tcp`, `wss` and `auto`'s fallback. Default: the server's port (ostp-py and
    upstream servers listen on TCP on their UDP ports); upstream's client uses 443."""
    sni: str | None = None
    """HTTP Host of the TCP transports' request, and the Reality SNI unless `reality` names one.
    Default: the server's IP address as text (spec §10.6)."""
    reality: RealityConfig | None = None
    """Reality for `tcp`, `wss` and `auto`'s fallback (unused over UDP)."""
    auto_fallback: Literal["tcp", "wss"] = "tcp"
    """`auto`: the TCP transport used while UDP does not pass."""
    auto_udp_timeout: Annotated[float, Field(ge=0.5, le=60)] = 3.0
    """`auto`: seconds a UDP handshake may take before the session uses TCP instead."""
    auto_probe_interval: Annotated[float, Field(ge=1, le=3600)] = 30.0
    """`auto`: seconds between UDP handshake probes while on TCP (doubling after each failure,
    up to 8 times this); the session moves back to UDP when one completes."""

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        parse_host_port(value)
        return value.strip()

    @field_validator("access_key")
    @classmethod
    def _check_key(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_serializer("access_key", when_used="always")
    def _reveal(self, value: SecretStr, info: SerializationInfo) -> str:
        return _secret_out(value, info)

    @field_validator("sni")
    @classmethod
    def _check_sni(cls, value: str | None) -> str | None:
        if value is not None and not _HOST_TEXT.fullmatch(value):
            raise ValueError("a host name or IP address (no spaces or other characters)")
        return value

    @field_validator("transport")
    @classmethod
    def _check_nat(cls, value: str, info: ValidationInfo) -> str:
        nat = info.data.get("nat")  # defined before `transport`: already validated
        if not isinstance(nat, NatConfig) or value == "udp":
            return value
        if value != "auto":
            raise ValueError(f"{value!r} cannot go with `nat` (STUN and TURN work over UDP only)")
        if nat.mode != "direct":
            raise ValueError("'auto' falls back to TCP, not to TURN: it needs nat mode 'direct'")
        return value

    @property
    def server_address(self) -> tuple[str, int]:
        return parse_host_port(self.server)


class DirectOutboundConfig(_Model):
    """Connects from this machine."""

    type: Literal["direct"] = "direct"
    tag: Annotated[str, Field(min_length=1)] = "direct"
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    bind_address: str | None = None
    """Local IP address to connect from (the origin sees it)."""
    override_address: str | None = None
    """Connect to this host instead of the requested one (the port is kept)."""
    override_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    routing_mark: Annotated[int, Field(ge=1, le=0xFFFFFFFF)] | None = None
    """Linux `SO_MARK` for this outbound's sockets (needs CAP_NET_ADMIN), for policy routing
    without a TUN. Unset: the mark of a running TUN inbound with `auto_route`, if any."""

    _routing_mark_text = field_validator("routing_mark", mode="before")(_mark_from_text)

    @field_validator("bind_address")
    @classmethod
    def _check_bind(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError("expected an IP address") from None
        return value


class BlockOutboundConfig(_Model):
    """Refuses every connection (SOCKS5 reply 0x02, HTTP 403)."""

    type: Literal["block"] = "block"
    tag: Annotated[str, Field(min_length=1)] = "block"


DEFAULT_TEST_URL = "http://cp.cloudflare.com/generate_204"
"""What urltest/fallback groups fetch through each member unless `url` says otherwise (any
HTTP answer counts; the time to its status line is the member's delay)."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: Any) -> Any:
    """Seconds as a number, or sing-box's duration text: `"3m"`, `"1m30s"`, `"500ms"`."""
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if not text:
            raise ValueError("empty duration")
        pos, total = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            total += float(match[1]) * _DURATION_SCALE[match[2]]
            pos = match.end()
        if pos != len(text):
            try:
                return float(text)
            except ValueError:
                raise ValueError(
                    f'{value!r} is not a duration (seconds, or text like "3m", "30s", "1m30s")'
                ) from None
        return total
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0, le=86400)]


def validate_test_url(value: str) -> str:
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"{value!r} has a bad port") from None
    return value.strip()


TestUrl = Annotated[str, AfterValidator(validate_test_url)]
GroupMembers = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class SelectorOutboundConfig(_Model):
    """A group whose member the user chooses (`ctl select`, the dashboard); the choice is kept
    in the state file across restarts."""

    type: Literal["selector"] = "selector"
    tag: Annotated[str, Field(min_length=1)] = "select"
    outbounds: GroupMembers
    """Member tags (outbounds or other groups)."""
    default: str | None = None
    """The member used until the user chooses one; the first member when absent."""


class UrlTestOutboundConfig(_Model):
    """A group that uses the member with the lowest delay of a real request through it."""

    type: Literal["urltest"] = "urltest"
    tag: Annotated[str, Field(min_length=1)] = "auto"
    outbounds: GroupMembers
    url: TestUrl = DEFAULT_TEST_URL
    """Fetched through each member (HTTP GET); the delay is the time to the status line."""
    interval: Duration = 180.0
    """Seconds (or `"3m"`) between checks of every member."""
    tolerance: Annotated[int, Field(ge=0, le=60000)] = 50
    """Milliseconds: the group switches only to a member faster than this by more than this."""
    timeout: Duration = 5.0
    """Seconds a check may take before the member counts as down."""


class FallbackOutboundConfig(_Model):
    """A group that uses the first member (in order) whose last check succeeded."""

    type: Literal["fallback"] = "fallback"
    tag: Annotated[str, Field(min_length=1)] = "fallback"
    outbounds: GroupMembers
    url: TestUrl = DEFAULT_TEST_URL
    interval: Duration = 180.0
    timeout: Duration = 5.0


GROUP_TYPES = ("selector", "urltest", "fallback")
GroupOutboundConfig = SelectorOutboundConfig | UrlTestOutboundConfig | FallbackOutboundConfig

OutboundConfig = Annotated[
    OstpOutboundConfig
    | DirectOutboundConfig
    | BlockOutboundConfig
    | SelectorOutboundConfig
    | UrlTestOutboundConfig
    | FallbackOutboundConfig,
    Field(discriminator="type"),
]

_PORT_RANGE = re.compile(r"^\s*(\d{0,5})\s*[-:]\s*(\d{0,5})\s*$")


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str | int) else value


DESTINATION_ADDRESS_CONDITIONS = (
    "domain",
    "domain_suffix",
    "domain_keyword",
    "domain_regex",
    "ip_cidr",
    "ip_is_private",
)
"""sing-box's destination-address group: alternatives within one rule (see router.py)."""
DESTINATION_PORT_CONDITIONS = ("port", "port_range")
SOURCE_ADDRESS_CONDITIONS = ("source_ip_cidr", "source_ip_is_private")
SOURCE_PORT_CONDITIONS = ("source_port", "source_port_range")
OTHER_CONDITIONS = ("network", "inbound", "process_name", "process_path", "rule_set")
RULE_CONDITIONS = (
    *DESTINATION_ADDRESS_CONDITIONS,
    *DESTINATION_PORT_CONDITIONS,
    *SOURCE_ADDRESS_CONDITIONS,
    *SOURCE_PORT_CONDITIONS,
    *OTHER_CONDITIONS,
)
_LIST_CONDITIONS = tuple(
    name for name in RULE_CONDITIONS if name not in ("ip_is_private", "source_ip_is_private")
)
PROCESS_CONDITIONS = ("process_name", "process_path")

PortNumber = Annotated[int, Field(ge=0, le=65535)]
PortRangeText = Annotated[str, AfterValidator(_port_range_item)]
RegexText = Annotated[str, AfterValidator(_regex_item)]


class HeadlessRule(_Model):
    """A default rule without an outbound (inside `logical` rules and rule sets).

    sing-box semantics: the values of one condition are alternatives; the conditions of one
    group (destination address: domain kinds, `ip_cidr`, `ip_is_private`, and the rule sets'
    entries of those kinds; destination port; source address; source port) are
    alternatives; the groups and every other condition must all match; `invert` negates.
    """

    type: Annotated[Literal["default"], Field(exclude=True)] = "default"
    domain: list[str] | None = None
    domain_suffix: list[str] | None = None
    domain_keyword: list[str] | None = None
    domain_regex: list[RegexText] | None = None
    ip_cidr: list[CidrText] | None = None
    ip_is_private: bool | None = None
    """Destination is a private, loopback, link-local or otherwise non-public address."""
    port: list[PortNumber] | None = None
    port_range: list[PortRangeText] | None = None
    source_ip_cidr: list[CidrText] | None = None
    source_ip_is_private: bool | None = None
    source_port: list[PortNumber] | None = None
    source_port_range: list[PortRangeText] | None = None
    network: list[Literal["tcp", "udp"]] | None = None
    inbound: list[str] | None = None
    process_name: list[Annotated[str, Field(min_length=1)]] | None = None
    """Name of the local program that opened the connection (Linux: `/proc/PID/comm`)."""
    process_path: list[Annotated[str, Field(min_length=1)]] | None = None
    """Full path of its executable (Linux: `/proc/PID/exe`)."""
    rule_set: list[Annotated[str, Field(min_length=1)]] | None = None
    """Tags of `routing.rule_set` entries; their rules' entries join this rule's groups."""
    invert: bool | None = None
    """Negate the rule (absent: false)."""

    @field_validator(*_LIST_CONDITIONS, mode="before")
    @classmethod
    def _normalize(cls, value: Any) -> Any:
        return _one_or_many(value)

    def conditions(self) -> dict[str, list[Any]]:
        """The conditions that are set, by name (booleans as a one-item list)."""
        found: dict[str, list[Any]] = {}
        for name in RULE_CONDITIONS:
            value = getattr(self, name)
            if value is not None:
                found[name] = value if isinstance(value, list) else [value]
        return found

    def describe(self) -> str:
        text = " ".join(
            f"{name}={','.join(str(v) for v in values)}"
            for name, values in self.conditions().items()
        )
        return f"not({text})" if self.invert else text


class HeadlessLogicalRule(_Model):
    """`"type": "logical"`: nested rules combined with `mode` `and`/`or`; `invert` negates."""

    type: Literal["logical"]
    mode: Literal["and", "or"]
    rules: Annotated[list[HeadlessRuleConfig], Field(min_length=1)]
    invert: bool | None = None
    """Negate the rule (absent: false)."""

    def conditions(self) -> dict[str, list[Any]]:
        """Every condition of the nested rules (for checks that look for a kind)."""
        found: dict[str, list[Any]] = {}
        for rule in self.rules:
            for name, values in rule.conditions().items():
                found.setdefault(name, []).extend(values)
        return found

    def describe(self) -> str:
        joined = f" {self.mode} ".join(f"({rule.describe()})" for rule in self.rules)
        return f"not({joined})" if self.invert else joined


def _rule_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "logical" if value.get("type") == "logical" else "default"
    return str(getattr(value, "type", "default"))


HeadlessRuleConfig = Annotated[
    Annotated[HeadlessRule, Tag("default")] | Annotated[HeadlessLogicalRule, Tag("logical")],
    Discriminator(_rule_kind),
]


HeadlessLogicalRule.model_rebuild()


class RoutingRule(HeadlessRule):
    """A default rule: its conditions (sing-box semantics, see `HeadlessRule`) → `outbound`."""

    outbound: Annotated[str, Field(min_length=1)]


class LogicalRoutingRule(HeadlessLogicalRule):
    """A logical rule → `outbound`."""

    outbound: Annotated[str, Field(min_length=1)]


RouteRuleConfig = Annotated[
    Annotated[RoutingRule, Tag("default")] | Annotated[LogicalRoutingRule, Tag("logical")],
    Discriminator(_rule_kind),
]


def parse_port_range(text: str) -> tuple[int, int]:
    """`"1000-2000"`, `"1000:2000"`, `":3000"` (from 0), `"4000:"` (to 65535) → `(low, high)`;
    raise ValueError otherwise."""
    match = _PORT_RANGE.match(text)
    if not match or not (match[1] or match[2]):
        raise ValueError(f"port range {text!r} should look like '1000-2000' or '1000:2000'")
    low = int(match[1]) if match[1] else 0
    high = int(match[2]) if match[2] else 65535
    if not low <= high <= 65535:
        raise ValueError(f"port range {text!r} must go from low to high within 0-65535")
    return low, high


class RuleSetConfig(_Model):
    """A rule set read from a local file; rules name it in `rule_set`."""

    tag: Annotated[str, Field(min_length=1)]
    type: Literal["local"] = "local"
    format: Literal["source", "text"] | None = None
    """`source`: sing-box's rule-set source format (JSON `{"version": N, "rules": [...]}`);
    `text`: one domain or CIDR a line. Absent: `source` for `.json` files, else `text`."""
    path: Annotated[str, Field(min_length=1)]
    """The file; a relative path is relative to the config file's directory. Re-read when it
    changes (checked every few seconds) and on `ctl reload`."""

    @property
    def effective_format(self) -> str:
        if self.format is not None:
            return self.format
        return "source" if self.path.lower().endswith(".json") else "text"


class RoutingConfig(_Model):
    rules: list[RouteRuleConfig] = Field(default_factory=list)
    rule_set: list[RuleSetConfig] = Field(default_factory=list)
    default_outbound: str | None = None
    """Tag used when no rule matches; the first outbound when absent."""


class ControlConfig(_Model):
    socket: str | None = None
    """Path of the control socket (the dashboard talks to it). Absent: the default path
    (`$XDG_RUNTIME_DIR/ostp-client/control.sock`, else `/tmp/ostp-client-<uid>/`); `""`
    disables it."""


def _default_inbounds() -> list[LocalProxyInboundConfig | TunInboundConfig]:
    return [LocalProxyInboundConfig()]


class ClientConfig(_Model):
    log: LogConfig = Field(default_factory=LogConfig)
    inbounds: list[InboundConfig] = Field(default_factory=_default_inbounds)
    outbounds: Annotated[list[OutboundConfig], Field(min_length=1)]
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    mux: MuxConfig = Field(default_factory=MuxConfig)
    """Default `mux` of every ostp outbound that has none."""
    control: ControlConfig = Field(default_factory=ControlConfig)
    metrics: MetricsConfig | None = None
    """Prometheus endpoint; absent: none."""

    @property
    def default_outbound(self) -> str:
        return self.routing.default_outbound or self.outbounds[0].tag

    def mux_for(self, outbound: OstpOutboundConfig) -> MuxConfig:
        return outbound.mux if outbound.mux is not None else self.mux

    _base_dir: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """The config file's directory (relative rule-set paths start here); else the cwd."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    def with_base_dir(self, directory: Path) -> ClientConfig:
        self._base_dir = directory
        return self

    def outbound(
        self, tag: str
    ) -> (
        OstpOutboundConfig
        | DirectOutboundConfig
        | BlockOutboundConfig
        | SelectorOutboundConfig
        | UrlTestOutboundConfig
        | FallbackOutboundConfig
    ):
        for item in self.outbounds:
            if item.tag == tag:
                return item
        raise KeyError(tag)


def _secret_out(value: SecretStr, info: SerializationInfo) -> str:
    context = info.context
    if isinstance(context, Mapping) and context.get("reveal_secrets"):
        return value.get_secret_value()
    return str(value)  # "**********"


# --------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    """JSON path of the field, e.g. `outbounds[0].server`; empty for the whole document."""
    message: str


@dataclass(eq=False)
class ConfigError(Exception):
    """An invalid configuration; `issues` say where and what."""

    issues: list[ConfigIssue]
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"invalid configuration{where}:"]
        for issue in self.issues:
            lines.append(f"  {issue.path or '(top level)'}: {issue.message}")
        return "\n".join(lines)


_SECRET_FIELDS = frozenset({"access_key", "password"})


def _format_path(loc: Sequence[int | str], data: Any) -> tuple[str, Any, bool]:
    """Render a pydantic `loc` as a JSON path, skipping discriminator-tag segments."""
    parts: list[str] = []
    node: Any = data
    secret = False
    for segment in loc:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
            node = node[segment] if isinstance(node, list) and segment < len(node) else None
            continue
        if isinstance(node, Mapping) and segment not in node and node.get("type") == segment:
            continue  # the union member pydantic tried, not a field
        if isinstance(node, Mapping) and segment not in node and segment in ("default", "logical"):
            continue  # the rule kind (routing rules' discriminator), not a field
        if (
            isinstance(node, Mapping)
            and segment not in node
            and segment.startswith(("function-", "list[", "union[", "tagged-union["))
        ):
            continue
        parts.append(f".{segment}" if parts else segment)
        secret = secret or segment in _SECRET_FIELDS
        node = node.get(segment) if isinstance(node, Mapping) else None
    return "".join(parts), node, secret


def _issue_message(error: Any, model_fields: Iterable[str], secret: bool) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        close = difflib.get_close_matches(name, list(model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field{hint}"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "missing 'type' (which kind of entry this is)"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    value = error.get("input")
    if not secret and isinstance(value, str | int | float | bool) and kind != "value_error":
        text = repr(value)
        message += f" (got {text[:60] + '...' if len(text) > 60 else text})"
    return message


def _all_field_names() -> list[str]:
    """Every field name of the config models (for "did you mean")."""
    names: set[str] = set()
    for model in (
        ClientConfig,
        LogConfig,
        LocalProxyInboundConfig,
        TunInboundConfig,
        UserConfig,
        MuxConfig,
        OstpOutboundConfig,
        DirectOutboundConfig,
        BlockOutboundConfig,
        RoutingConfig,
        RoutingRule,
        LogicalRoutingRule,
        RuleSetConfig,
        SelectorOutboundConfig,
        UrlTestOutboundConfig,
        FallbackOutboundConfig,
        ControlConfig,
        MetricsConfig,
    ):
        names.update(model.model_fields)
    return sorted(names)


def _issues_from_validation(exc: ValidationError, data: Any) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        path, _, secret = _format_path(error["loc"], data)
        issues.append(ConfigIssue(path, _issue_message(error, _all_field_names(), secret)))
    return issues


@dataclass(slots=True)
class _RulePart:
    index: int
    outbound: str | None
    inbounds: list[str]
    has_conditions: bool | None
    """None: unknown (the rule did not validate)."""
    rule_sets: list[tuple[str, str]] = field(default_factory=list)
    """(JSON path of the reference, rule-set tag)."""
    process: list[str] = field(default_factory=list)
    """JSON paths of process conditions."""


@dataclass(slots=True)
class _GroupPart:
    index: int
    tag: str
    members: list[str]
    default: str | None = None


@dataclass(slots=True)
class _Parts:
    """What the checks across entries look at: the validated config's entries or, when the
    config did not validate, those that validate on their own (and the tags of the others as
    written), so that these problems are reported together with the field errors."""

    outbound_tags: list[tuple[int, str]] = field(default_factory=list)
    outbounds_known: bool = True
    """Every outbound's tag is known (else references to unknown tags are not judged)."""
    inbounds: list[tuple[int, LocalProxyInboundConfig | TunInboundConfig]] = field(
        default_factory=list
    )
    inbound_tags: list[tuple[int, str]] = field(default_factory=list)
    inbounds_known: bool = True
    rules: list[_RulePart] = field(default_factory=list)
    groups: list[_GroupPart] = field(default_factory=list)
    rule_set_tags: list[tuple[int, str]] = field(default_factory=list)
    rule_sets_known: bool = True
    default_outbound: str | None = None


def _walk_rule(
    rule: RoutingRule | LogicalRoutingRule | HeadlessRule | HeadlessLogicalRule,
    path: str,
    part: _RulePart,
) -> None:
    """Collect the references of a rule and its nested rules (with their JSON paths)."""
    if isinstance(rule, HeadlessLogicalRule):
        for index, nested in enumerate(rule.rules):
            _walk_rule(nested, f"{path}.rules[{index}]", part)
        return
    part.inbounds.extend(rule.inbound or ())
    for index, tag in enumerate(rule.rule_set or ()):
        part.rule_sets.append((f"{path}.rule_set[{index}]", tag))
    part.process.extend(f"{path}.{name}" for name in PROCESS_CONDITIONS if getattr(rule, name))


def _rule_part(index: int, rule: RoutingRule | LogicalRoutingRule) -> _RulePart:
    has = True if isinstance(rule, LogicalRoutingRule) else bool(rule.conditions())
    part = _RulePart(index, rule.outbound, [], has)
    _walk_rule(rule, f"routing.rules[{index}]", part)
    return part


def _group_part(index: int, item: Any) -> _GroupPart | None:
    if isinstance(item, GroupOutboundConfig):
        default = item.default if isinstance(item, SelectorOutboundConfig) else None
        return _GroupPart(index, item.tag, list(item.outbounds), default)
    return None


def _parts_of(config: ClientConfig) -> _Parts:
    return _Parts(
        outbound_tags=[(i, o.tag) for i, o in enumerate(config.outbounds)],
        inbounds=list(enumerate(config.inbounds)),
        inbound_tags=[(i, entry.tag) for i, entry in enumerate(config.inbounds)],
        rules=[_rule_part(i, rule) for i, rule in enumerate(config.routing.rules)],
        groups=[g for i, o in enumerate(config.outbounds) if (g := _group_part(i, o)) is not None],
        rule_set_tags=[(i, r.tag) for i, r in enumerate(config.routing.rule_set)],
        default_outbound=config.routing.default_outbound,
    )


_OUTBOUND_ADAPTER: TypeAdapter[Any] = TypeAdapter(OutboundConfig)
_INBOUND_ADAPTER: TypeAdapter[Any] = TypeAdapter(InboundConfig)
_RULE_ADAPTER: TypeAdapter[Any] = TypeAdapter(RouteRuleConfig)
_RULE_SET_ADAPTER: TypeAdapter[Any] = TypeAdapter(RuleSetConfig)


def _default_tags(*models: type[BaseModel]) -> dict[str, str]:
    return {m.model_fields["type"].default: m.model_fields["tag"].default for m in models}


def _entries(
    raw: Any, adapter: TypeAdapter[Any], default_tags: Mapping[str, str]
) -> tuple[list[tuple[int, Any]], list[tuple[int, str]], bool]:
    """(entries that validate, tags by index, whether every tag is known) of a raw list."""
    if not isinstance(raw, list):
        return [], [], False
    valid: list[tuple[int, Any]] = []
    tags: list[tuple[int, str]] = []
    known = True
    for index, item in enumerate(raw):
        try:
            entry = adapter.validate_python(item)
        except ValidationError:
            tag = None
            if isinstance(item, Mapping):
                tag = item.get("tag", default_tags.get(str(item.get("type"))))
            if isinstance(tag, str):
                tags.append((index, tag))
            else:
                known = False
            continue
        valid.append((index, entry))
        tags.append((index, entry.tag))
    return valid, tags, known


_OUTBOUND_MODELS = (
    OstpOutboundConfig,
    DirectOutboundConfig,
    BlockOutboundConfig,
    SelectorOutboundConfig,
    UrlTestOutboundConfig,
    FallbackOutboundConfig,
)


def _parts_of_raw(data: Mapping[str, Any]) -> _Parts:
    parts = _Parts()
    outbounds, parts.outbound_tags, parts.outbounds_known = _entries(
        data.get("outbounds"), _OUTBOUND_ADAPTER, _default_tags(*_OUTBOUND_MODELS)
    )
    parts.groups = [g for i, o in outbounds if (g := _group_part(i, o)) is not None]
    inbounds_raw = data.get("inbounds", [{"type": "local_proxy"}])  # the default inbound
    parts.inbounds, parts.inbound_tags, parts.inbounds_known = _entries(
        inbounds_raw, _INBOUND_ADAPTER, _default_tags(LocalProxyInboundConfig, TunInboundConfig)
    )
    routing = data.get("routing")
    if not isinstance(routing, Mapping):
        return parts
    default = routing.get("default_outbound")
    parts.default_outbound = default if isinstance(default, str) else None
    raw_sets = routing.get("rule_set", [])
    _, parts.rule_set_tags, parts.rule_sets_known = _entries(
        raw_sets if isinstance(raw_sets, list) else [], _RULE_SET_ADAPTER, {}
    )
    rules = routing.get("rules")
    for index, item in enumerate(rules if isinstance(rules, list) else ()):
        if not isinstance(item, Mapping):
            continue
        try:
            parts.rules.append(_rule_part(index, _RULE_ADAPTER.validate_python(item)))
            continue
        except ValidationError:
            pass
        outbound = item.get("outbound")
        inbound = _one_or_many(item.get("inbound")) or []
        parts.rules.append(
            _RulePart(
                index,
                outbound if isinstance(outbound, str) else None,
                [tag for tag in inbound if isinstance(tag, str)]
                if isinstance(inbound, list)
                else [],
                None,
            )
        )
    return parts


def _duplicate_tags(kind: str, tags: list[tuple[int, str]]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    first: dict[str, int] = {}
    for index, tag in tags:
        seen = first.setdefault(tag, index)
        if seen != index:
            issues.append(
                ConfigIssue(f"{kind}[{index}].tag", f"duplicate tag {tag!r} (also {kind}[{seen}])")
            )
    return issues


def _check_groups(parts: _Parts, outbound_tags: set[str], known: str) -> list[ConfigIssue]:
    """Group members exist, a selector's default is a member, and no group contains itself."""
    issues: list[ConfigIssue] = []
    members_of = {group.tag: group.members for group in parts.groups}
    for group in parts.groups:
        path = f"outbounds[{group.index}]"
        for position, member in enumerate(group.members):
            if parts.outbounds_known and member not in outbound_tags:
                issues.append(
                    ConfigIssue(
                        f"{path}.outbounds[{position}]",
                        f"no outbound is tagged {member!r} (have {known})",
                    )
                )
        if group.default is not None and group.default not in group.members:
            issues.append(
                ConfigIssue(f"{path}.default", f"{group.default!r} is not one of the outbounds")
            )
        for position, member in enumerate(group.members):
            cycle = _cycle_from(group.tag, member, members_of)
            if cycle is not None:
                issues.append(
                    ConfigIssue(
                        f"{path}.outbounds[{position}]",
                        f"groups form a cycle: {' -> '.join(repr(t) for t in cycle)}",
                    )
                )
    return issues


def _cycle_from(start: str, member: str, members_of: Mapping[str, list[str]]) -> list[str] | None:
    """The path `start -> member -> ... -> start`, if the member leads back (depth-first)."""
    stack: list[tuple[str, list[str]]] = [(member, [start, member])]
    seen: set[str] = set()
    while stack:
        tag, path = stack.pop()
        if tag == start:
            return path
        if tag in seen:
            continue
        seen.add(tag)
        for nested in members_of.get(tag, ()):
            stack.append((nested, [*path, nested]))
    return None


PROCESS_RULE_PLATFORMS = ("linux",)


def _check_references(parts: _Parts, platform: str | None = None) -> list[ConfigIssue]:
    platform = sys.platform if platform is None else platform
    issues = _duplicate_tags("outbounds", parts.outbound_tags)
    issues += _duplicate_tags("inbounds", parts.inbound_tags)
    issues += _duplicate_tags("routing.rule_set", parts.rule_set_tags)
    outbound_tags = {tag for _, tag in parts.outbound_tags}
    inbound_tags = {tag for _, tag in parts.inbound_tags}
    rule_set_tags = {tag for _, tag in parts.rule_set_tags}
    known = ", ".join(repr(tag) for tag in dict.fromkeys(tag for _, tag in parts.outbound_tags))
    issues += _check_groups(parts, outbound_tags, known)
    for rule in parts.rules:
        path = f"routing.rules[{rule.index}]"
        outbound = rule.outbound
        if parts.outbounds_known and outbound is not None and outbound not in outbound_tags:
            issues.append(
                ConfigIssue(
                    f"{path}.outbound", f"no outbound is tagged {outbound!r} (have {known})"
                )
            )
        if rule.has_conditions is False:
            issues.append(
                ConfigIssue(path, "a rule needs at least one condition (use default_outbound)")
            )
        if parts.inbounds_known:
            for tag in rule.inbounds:
                if tag not in inbound_tags:
                    issues.append(ConfigIssue(f"{path}.inbound", f"no inbound is tagged {tag!r}"))
        if parts.rule_sets_known:
            for where, tag in rule.rule_sets:
                if tag not in rule_set_tags:
                    have = ", ".join(repr(t) for t in sorted(rule_set_tags)) or "none"
                    issues.append(
                        ConfigIssue(where, f"no rule set is tagged {tag!r} (have {have})")
                    )
        if platform not in PROCESS_RULE_PLATFORMS:
            issues.extend(
                ConfigIssue(
                    where,
                    f"process rules are supported on Linux only (this is {platform}): the owner"
                    " of a connection is found through sock_diag and /proc",
                )
                for where in rule.process
            )
    default = parts.default_outbound
    if parts.outbounds_known and default is not None and default not in outbound_tags:
        issues.append(
            ConfigIssue(
                "routing.default_outbound", f"no outbound is tagged {default!r} (have {known})"
            )
        )
    return issues


def _listen_ips(listen: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if listen == "localhost":  # anyio binds every address the name has
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    return [ipaddress.ip_address(listen)]


def _listens_overlap(a: str, b: str) -> bool:
    """Two listeners on one port collide: the same address, or a wildcard of the same family
    (`::` is IPv6 only: the daemon binds it with IPV6_V6ONLY, so it leaves 0.0.0.0 alone)."""
    return any(
        x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)
        for x in _listen_ips(a)
        for y in _listen_ips(b)
    )


def _endpoint(listen: str, port: int) -> str:
    return f"[{listen}]:{port}" if ":" in listen else f"{listen}:{port}"


def _check_listeners(parts: _Parts) -> list[ConfigIssue]:
    """Two inbounds on the same address and port (a fixed port; 0 picks a free one)."""
    issues: list[ConfigIssue] = []
    bound: list[tuple[int, LocalProxyInboundConfig]] = []
    for index, entry in parts.inbounds:
        if not isinstance(entry, LocalProxyInboundConfig) or entry.port == 0:
            continue
        for other_index, other in bound:
            if other.port == entry.port and _listens_overlap(entry.listen, other.listen):
                issues.append(
                    ConfigIssue(
                        f"inbounds[{index}].port",
                        f"{_endpoint(entry.listen, entry.port)} collides with inbounds"
                        f"[{other_index}] on {_endpoint(other.listen, other.port)}"
                        " (one address and port per inbound)",
                    )
                )
                break
        bound.append((index, entry))
    return issues


# --------------------------------------------------------------------------------------------
# loading


def strip_json_comments(text: str) -> str:
    """Remove `//` line comments and `/* */` block comments outside JSON strings.

    Comment characters are replaced by spaces (newlines kept) so that error positions still
    point at the right line and column.
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def is_flat_config(data: Mapping[str, Any]) -> bool:
    """Upstream's flat client config (spec §10.10) rather than the native format."""
    return "mode" in data or ("outbounds" not in data and "access_key" in data)


def parse_config_text(text: str, source: str = "") -> tuple[ClientConfig, list[str]]:
    """Parse and validate config text; return the config and conversion warnings."""
    try:
        data = json.loads(strip_json_comments(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")],
            source,
        ) from None
    return config_from_data(data, source)


def config_from_data(data: Any, source: str = "") -> tuple[ClientConfig, list[str]]:
    """Validate config data (native or flat); `ConfigError` lists every problem found."""
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the configuration must be a JSON object")], source)
    flat = is_flat_config(data)
    issues: list[ConfigIssue] = []
    lists: dict[str, tuple[str, list[int]]] = {}
    if flat:
        conversion = _convert_flat(data)
        data, warnings, issues, lists = (
            conversion.data,
            conversion.warnings,
            conversion.issues,
            conversion.lists,
        )
    config: ClientConfig | None = None
    try:
        config = ClientConfig.model_validate(data)
    except ValidationError as exc:
        found = _issues_from_validation(exc, data)
        if flat:
            found = [ConfigIssue(_flat_path(i.path, lists), i.message) for i in found]
        issues += found
    parts = _parts_of(config) if config is not None else _parts_of_raw(data)
    issues += _check_references(parts) + _check_listeners(parts)
    if issues or config is None:
        raise ConfigError(issues, source, warnings)
    return config, warnings


_FLAT_PATHS = (
    ("outbounds[0].transport_port", "transport.stealth_port"),
    ("outbounds[0].sni", "transport.stealth_sni"),
    ("outbounds[0].reality.public_key", "reality.pbk"),
    ("outbounds[0].reality.short_id", "reality.sid"),
    ("outbounds[0].reality.server_name", "reality.sni"),
    ("outbounds[0].", ""),
    ("inbounds[0].listen", "socks5_bind"),
    ("inbounds[0].port", "socks5_bind"),
    ("routing.rules[0].domain_suffix", "exclude.domains"),
    ("routing.rules[0].ip_cidr", "exclude.ips"),
    ("routing.rules[1].ip_cidr", "exclude.ips"),
)


def _flat_path(path: str, lists: Mapping[str, tuple[str, list[int]]] | None = None) -> str:
    """Map a native path back to the flat config's key (spec §10.10) for error messages."""
    for native, (flat, positions) in (lists or {}).items():
        if path.startswith(native + "["):
            number, _, rest = path[len(native) + 1 :].partition("]")
            if number.isdigit() and int(number) < len(positions):
                return f"{flat}[{positions[int(number)]}]{rest}"
    for native, flat in _FLAT_PATHS:
        if path.startswith(native):
            return flat + path[len(native) :] if native.endswith(".") else flat
    return path


def load_config(path: str | Path) -> tuple[ClientConfig, list[str]]:
    """Read and validate a config file; raise ConfigError (also for a missing file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    "file not found (write one with `ostp-client import 'ostp://KEY@HOST:PORT'"
                    f" -o {path}`)",
                )
            ],
            str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc}")], str(path)) from None
    config, warnings = parse_config_text(text, str(path))
    return config.with_base_dir(path.resolve().parent), warnings


def dump_config(config: ClientConfig, *, reveal_secrets: bool = True) -> str:
    """Canonical JSON text of a config (secrets written out only with `reveal_secrets`)."""
    data = config.model_dump(
        mode="json", exclude_none=True, context={"reveal_secrets": reveal_secrets}
    )
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def config_json_schema() -> dict[str, Any]:
    schema = ClientConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ostp-client configuration"
    return schema


# --------------------------------------------------------------------------------------------
# upstream's flat config (spec §10.10)


@dataclass(slots=True)
class _FlatConversion:
    data: dict[str, Any]
    """The native layout, unvalidated (a bad flat field is left at its default here)."""
    warnings: list[str] = field(default_factory=list)
    issues: list[ConfigIssue] = field(default_factory=list)
    lists: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    """Native list path → (flat path, index of each item in the flat list)."""


def _flat_list(
    exclude: Mapping[str, Any], name: str, issues: list[ConfigIssue]
) -> tuple[list[str], list[int]]:
    """`exclude.<name>`: the non-empty items (text) and their indices in the flat list."""
    raw = exclude.get(name)
    if raw is None:
        return [], []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        issues.append(ConfigIssue(f"exclude.{name}", "expected a list"))
        return [], []
    items: list[str] = []
    positions: list[int] = []
    for index, item in enumerate(raw):
        text = str(item).strip()
        if text:
            items.append(text)
            positions.append(index)
    return items, positions


def _convert_flat(flat: Mapping[str, Any]) -> _FlatConversion:
    """Upstream's flat client config in the native layout, with every problem found."""
    issues: list[ConfigIssue] = []
    warnings: list[str] = []
    mode = flat.get("mode", "client")
    if mode != "client":
        issues.append(
            ConfigIssue("mode", f'{mode!r} is not a client config (ostp-client needs "client")')
        )
    listen, port = "127.0.0.1", DEFAULT_PROXY_PORT
    bind = flat.get("socks5_bind")
    if bind is not None:
        try:
            listen, port = parse_host_port(str(bind))
        except ValueError as exc:
            issues.append(ConfigIssue("socks5_bind", str(exc)))
    # server and access_key go through as written: a missing or bad one is reported by the
    # validation, under its flat name
    outbound: dict[str, Any] = {"type": "ostp", "tag": "proxy", "mtu": flat.get("mtu", DEFAULT_MTU)}
    outbound.update({name: flat[name] for name in ("server", "access_key") if name in flat})
    mux = flat.get("mux")
    if isinstance(mux, Mapping):
        outbound["mux"] = {
            "enabled": mux.get("enabled", False),
            "sessions": mux.get("sessions", 1),
        }
    elif mux is not None:
        issues.append(ConfigIssue("mux", "expected an object with enabled and sessions"))
    rules: list[dict[str, Any]] = []
    lists: dict[str, tuple[str, list[int]]] = {}
    exclude = flat.get("exclude") or {}
    if not isinstance(exclude, Mapping):
        issues.append(ConfigIssue("exclude", "expected an object with domains/ips lists"))
        exclude = {}
    domains, domain_positions = _flat_list(exclude, "domains", issues)
    ips, ip_positions = _flat_list(exclude, "ips", issues)
    if domains:
        # spec §10.8: suffix match, leading '.' ignored
        lists[f"routing.rules[{len(rules)}].domain_suffix"] = ("exclude.domains", domain_positions)
        rules.append({"domain_suffix": [d.lstrip(".") for d in domains], "outbound": "direct"})
    if ips:
        lists[f"routing.rules[{len(rules)}].ip_cidr"] = ("exclude.ips", ip_positions)
        rules.append({"ip_cidr": ips, "outbound": "direct"})
        warnings.append(
            "exclude.ips match only IP destinations; names are not resolved for the match"
        )
    if exclude.get("processes"):
        warnings.append("exclude.processes is ignored (as upstream does)")
    tun = flat.get("tun")
    if isinstance(tun, Mapping) and tun.get("enable"):
        warnings.append("tun.enable: TUN mode is not available yet; running as a local proxy")
    outbound.update(_flat_transport(flat, issues, warnings))
    level = "debug" if flat.get("debug") else "info"
    converted: dict[str, Any] = {
        "log": {"level": level},
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "listen": listen, "port": port}],
        "outbounds": [outbound, {"type": "direct", "tag": "direct"}],
        "routing": {"rules": rules, "default_outbound": "proxy"},
    }
    return _FlatConversion(converted, warnings, issues, lists)


def _flat_transport(
    flat: Mapping[str, Any], issues: list[ConfigIssue], warnings: list[str]
) -> dict[str, Any]:
    """Upstream's `transport` and `reality` blocks (spec §10.10) as outbound fields."""
    fields: dict[str, Any] = {}
    transport = flat.get("transport")
    if transport is None:
        transport = {}
    elif not isinstance(transport, Mapping):
        issues.append(ConfigIssue("transport", "expected an object with mode, stealth_sni, ..."))
        transport = {}
    mode = str(transport.get("mode", "udp")).strip().lower()
    wss = transport.get("wss") is True
    if mode in ("uot", "tcp"):
        fields["transport"] = "wss" if wss else "tcp"
        port = transport.get("stealth_port")
        if port is None:
            warnings.append(
                "transport.stealth_port is not set: upstream's client would use 443; "
                "using the server's port (where ostp-py and upstream servers listen on TCP)"
            )
        else:
            fields["transport_port"] = port
    elif mode != "udp":
        issues.append(ConfigIssue("transport.mode", f"{mode!r}: expected udp, uot or tcp"))
    elif wss:
        warnings.append("transport.wss applies to mode uot/tcp only (as upstream); using udp")
    sni = transport.get("stealth_sni")
    if isinstance(sni, str) and sni.strip():
        fields["sni"] = sni.strip()
    reality = flat.get("reality")
    if isinstance(reality, Mapping) and reality.get("enabled") is True:
        if fields.get("transport") not in ("tcp", "wss"):
            warnings.append("reality is used with transport mode uot/tcp only (as upstream)")
        block: dict[str, Any] = {"public_key": reality.get("pbk"), "short_id": reality.get("sid")}
        # spec §10.6: upstream's ClientHello carries stealth_sni (which `sni` is, and the
        # Reality SNI defaults to); reality.sni only stands in when it is missing
        name = reality.get("sni")
        if "sni" not in fields and isinstance(name, str) and name.strip():
            block["server_name"] = name.strip()
        fields["reality"] = block
        if reality.get("fp") or reality.get("spx"):
            warnings.append(
                "reality.fp and reality.spx are ignored: the ClientHello is upstream's fixed one"
                " (upstream ignores them too)"
            )
    elif reality is not None and not isinstance(reality, Mapping):
        issues.append(ConfigIssue("reality", "expected an object with enabled, pbk, sid, ..."))
    return fields


def convert_flat_config(
    flat: Mapping[str, Any], source: str = ""
) -> tuple[dict[str, Any], list[str]]:
    """Convert upstream's flat client config into the native layout (unvalidated dict).

    Raises `ConfigError` with every problem the conversion itself finds (the native config's
    validation finds the rest: `config_from_data`).
    """
    conversion = _convert_flat(flat)
    if conversion.issues:
        raise ConfigError(conversion.issues, source, conversion.warnings)
    return conversion.data, conversion.warnings


# --------------------------------------------------------------------------------------------
# share links (spec §10.9)

SHARE_LINK_SCHEME = "ostp://"


@dataclass(frozen=True, slots=True)
class ShareLink:
    access_key: str
    host: str
    port: int
    query: dict[str, str]
    name: str


def parse_share_link(link: str) -> ShareLink:
    """Parse `ostp://KEY@HOST:PORT[?query][#name]`; raise ValueError with a reason."""
    link = link.strip()
    if not link.lower().startswith(SHARE_LINK_SCHEME):
        raise ValueError("a share link starts with ostp://")
    rest = link[len(SHARE_LINK_SCHEME) :]
    rest, _, fragment = rest.partition("#")
    authority, _, query_text = rest.partition("?")
    authority = authority.rstrip("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at or not userinfo:
        raise ValueError("missing access key (ostp://KEY@HOST:PORT)")
    key = userinfo.split(":", 1)[0]  # the userinfo's user part, taken as written (spec §10.9)
    if not key:
        raise ValueError("empty access key")
    host, port = parse_host_port(hostport)
    query = {k: v for k, v in parse_qsl(query_text, keep_blank_values=True)}
    return ShareLink(key, host, port, query, unquote(fragment))


# outbound field path → the share-link key it came from (for error messages)
_LINK_KEYS = {
    ("sni",): "sni",
    ("reality", "public_key"): "pbk",
    ("reality", "short_id"): "sid",
    ("reality", "server_name"): "sni",
}


def _link_transport(query: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
    """The transport keys of a share link (spec §10.9) as outbound fields.

    `type=tcp|uot` selects UDP over TCP (`wss=true`: WebSocket), to the link's own port (where
    ostp-py and upstream servers listen on TCP; upstream's client would use 443). `pbk` and
    `sid` (with or without `security=reality`) add Reality; `fp` and `spx` are ignored, as
    upstream's client ignores them.
    """
    fields: dict[str, Any] = {}
    mode = query.get("type", "udp").strip().lower() or "udp"
    wss = query.get("wss", "").strip().lower() == "true"
    if mode in ("tcp", "uot"):
        fields["transport"] = "wss" if wss else "tcp"
    elif mode != "udp":
        warnings.append(f"type={mode}: unknown transport; using udp")
    elif wss:
        warnings.append("wss=true applies to type=tcp only (as upstream); using udp")
    sni = query.get("sni", "").strip()
    if sni:
        fields["sni"] = sni
    security = query.get("security", "").strip().lower()
    pbk, sid = query.get("pbk", "").strip(), query.get("sid", "").strip()
    if security == "reality" or pbk:
        if not pbk or not sid:
            raise ValueError("Reality needs both pbk (the server's public key) and sid")
        fields["reality"] = {"public_key": pbk, "short_id": sid}
        if "transport" not in fields:
            warnings.append(
                "Reality is used over TCP only; this link says UDP (set transport to tcp, wss"
                " or auto to use it)"
            )
    elif security not in ("", "none"):
        warnings.append(f"security={security} is ignored (only reality is known)")
    ignored = [key for key in ("fp", "spx") if query.get(key)]
    if ignored:
        warnings.append(
            f"{' and '.join(ignored)} ignored: the ClientHello is upstream's fixed one"
            " (upstream ignores them too)"
        )
    if query.get("owndns"):
        warnings.append("owndns is ignored (as upstream does)")
    return fields


def ostp_outbound_from_share_link(
    link: str, tag: str = "proxy", warnings: list[str] | None = None
) -> OstpOutboundConfig:
    """The `ostp` outbound of a share link; ValueError names the link key that is wrong."""
    parsed = parse_share_link(link)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    data: dict[str, Any] = {
        "tag": tag,
        "server": f"{host}:{parsed.port}",
        "access_key": parsed.access_key,
        **_link_transport(parsed.query, warnings if warnings is not None else []),
    }
    try:
        return OstpOutboundConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = _LINK_KEYS.get(tuple(str(p) for p in error["loc"]), ".".join(map(str, error["loc"])))
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{key}: {message}") from None


def config_from_share_link(link: str) -> tuple[ClientConfig, list[str]]:
    """A complete client config for a share link: local proxy on 127.0.0.1:1088 → ostp."""
    parsed = parse_share_link(link)
    warnings: list[str] = []
    if parsed.query.get("tun", "").lower() == "true":
        warnings.append("tun=true: TUN mode is not available yet; using the local proxy")
    outbound = ostp_outbound_from_share_link(link, warnings=warnings)
    config = ClientConfig(
        inbounds=[LocalProxyInboundConfig()],
        outbounds=[outbound, DirectOutboundConfig(), BlockOutboundConfig()],
        routing=RoutingConfig(default_outbound=outbound.tag),
    )
    return config, warnings
