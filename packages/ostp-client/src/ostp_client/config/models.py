"""The configuration's pydantic models: inbounds, outbounds, groups, routing rules, the whole file.

Each model checks its own fields; checks that span the file (tags that must exist, listeners
that must not overlap) are in `ostp_client.config.issues`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

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
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from ostp_proto.address import parse_host_port

DEFAULT_PROXY_PORT = 1088  # spec §10.10 socks5_bind default 127.0.0.1:1088
DEFAULT_MTU = 65535
"""Ceiling of path MTU discovery: on loopback datagrams grow to 64 KB, on a real path the
first hop's MTU caps them (upstream's CLI default, 1350, fixed the datagram size; spec §10.10)."""
DEFAULT_KEEPALIVE = 5.0  # spec §10.2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


def one_or_many(value: Any) -> Any:
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
        return one_or_many(value)

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
