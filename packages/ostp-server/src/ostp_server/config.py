"""The server's configuration file (JSON), its own format and upstream's server.json.

Upstream's keys (spec §10.10: ``"mode": "server"``, ``"listen"`` as a string or a list,
``"access_keys"`` as strings or ``{access_key, name?, limit_bytes?}``, ``"reality"`` with
upstream's names ``sid``/``sni_list``) are accepted unchanged; keys this server does not
implement (``outbound``, ``api``, ...) are ignored and reported by
:meth:`ServerConfig.ignored_keys` so the CLI can warn about them.
"""

from __future__ import annotations

import binascii
import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ostp_proto.address import parse_host_port
from ostp_proto.transport import decode_key, encode_key, public_key

__all__ = [
    "ConfigError",
    "MetricsConfig",
    "RealityConfig",
    "ServerConfig",
    "User",
    "load_config",
    "parse_config_text",
]

DEFAULT_PORT = 50000  # upstream's default listen port (server.json template)


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message says where and why."""


class User(BaseModel):
    """One access key with a name for logs and counters (the key itself is never logged)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: SecretStr = Field(validation_alias=AliasChoices("key", "access_key"))
    name: str | None = None
    limit_bytes: int | None = None
    """Traffic limit (bytes up + down, counted since the server started): a user over it has
    its sessions ended and new handshakes refused (spec §9.4)."""

    @field_validator("key")
    @classmethod
    def _non_empty(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw:
            raise ValueError("the access key must not be empty")
        if len(raw.encode()) > 964:
            raise ValueError("the access key must be at most 964 bytes (spec §3)")
        return v


class RealityConfig(BaseModel):
    """``"reality"``: TLS camouflage on the TCP port and the real site behind it (spec §10.6)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    enabled: bool = True
    """Upstream's switch; ``false`` ignores the whole block."""
    private_key: SecretStr | None = None
    """The server's X25519 private key, base64url (``ostp-server gen-key --reality``)."""
    short_id: str | None = Field(default=None, validation_alias=AliasChoices("short_id", "sid"))
    """16 hex characters every client's hello must carry (upstream: ``sid``)."""
    server_names: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("server_names", "sni_list")
    )
    """SNI values accepted in a client's hello (upstream: ``sni_list``); the first goes into
    share links."""
    dest: str | None = None
    """``host:port`` of the real site: every connection that is not an OSTP client of ours
    (a probe, a browser, a bad token, a hello that does not authenticate) is relayed there byte
    for byte. Without it such connections get upstream's 404 (HTTP) or are closed (TLS)."""
    pbk: str | None = None
    """Upstream writes the public key here too; if present it must match ``private_key``."""

    @field_validator("short_id")
    @classmethod
    def _short_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raw = b""
        if len(raw) != 8:
            raise ValueError("the short id is 16 hex characters")
        return v

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v

    @model_validator(mode="after")
    def _complete(self) -> RealityConfig:
        if not self.enabled:
            return self
        if self.private_key is None:
            raise ValueError("reality.private_key is required (ostp-server gen-key --reality)")
        try:
            private = decode_key(self.private_key.get_secret_value())
        except ValueError as e:
            raise ValueError(f"reality.private_key: {e}") from None
        if self.short_id is None:
            raise ValueError("reality.short_id is required")
        if not self.server_names:
            raise ValueError("reality.server_names needs at least one name")
        if self.pbk is not None:
            try:
                matches = decode_key(self.pbk) == public_key(private)
            except (ValueError, binascii.Error):
                matches = False
            if not matches:
                raise ValueError("reality.pbk is not the public key of reality.private_key")
        return self

    @property
    def private_key_bytes(self) -> bytes:
        assert self.private_key is not None
        return decode_key(self.private_key.get_secret_value())

    @property
    def public_key_text(self) -> str:
        """``pbk`` for share links."""
        return encode_key(public_key(self.private_key_bytes))

    @property
    def dest_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.dest) if self.dest else None


class MetricsConfig(BaseModel):
    """`metrics` in server.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:9100"
    """`host:port` of the HTTP endpoint; loopback by default."""

    @field_validator("listen")
    @classmethod
    def _listen_ip(cls, value: str) -> str:
        host, _port = parse_host_port(value)  # port 0 refused: scrapers need a known port
        ipaddress.ip_address(host)  # ValueError: not an IP address
        return value.strip()

    @property
    def address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class ServerConfig(BaseModel):
    """Everything ``ostp-server run`` reads from its JSON file."""

    model_config = ConfigDict(extra="allow", frozen=True)

    mode: Literal["server"] = "server"
    listen: list[str] = Field(default_factory=lambda: [f"0.0.0.0:{DEFAULT_PORT}"])
    """UDP addresses to listen on (``host:port``, IPv6 in brackets); one string or a list."""
    access_keys: list[User] = Field(min_length=1)
    """Access keys: plain strings or ``{"name": ..., "key": ...}`` objects."""
    max_sessions: int = Field(default=1024, ge=1)
    """Handshakes beyond this many live sessions are dropped silently (spec §9.2)."""
    idle_timeout: float = Field(default=600.0, gt=0)
    """Seconds without an authenticated datagram after which a session is dropped (spec §9.3)."""
    half_open_timeout: float = Field(default=10.0, gt=0)
    """While the table is full, a session that has not sent one authenticated datagram since
    its handshake is ended after this many seconds to make room for a new handshake, oldest
    first (a real client sends a Ping at once, spec §10.1; upstream keeps it for
    ``idle_timeout``)."""
    connect_timeout: float = Field(default=10.0, gt=0)
    """Seconds for resolving and connecting a Connect target (spec §9.5)."""
    max_streams: int = Field(default=1024, ge=1)
    """Open TCP streams and UDP associations per session (each holds a file descriptor)."""
    udp_idle_timeout: float = Field(default=120.0, gt=0)
    """Seconds after which a UDP association without traffic is closed."""
    max_datagram_size: int = Field(default=65507, ge=256, le=65507)
    """Largest data datagram the server builds (UDP payload bytes). Over UDP the ceiling of
    path MTU discovery: datagrams start at 1,232 bytes and grow as probes show the path carries
    them, never beyond the first hop's MTU and never fragmented (on loopback up to 64 KB; upstream
    sends ~4.2 KB, which IP fragments on real links). Over TCP the fixed datagram size."""
    remote_buffer: int = Field(default=4 << 20, ge=65536)
    """Bytes of client data per session waiting for slow remotes before the session's
    datagrams are dropped (the client's ARQ resends them: backpressure by loss)."""
    stall_timeout: float = Field(default=15.0, gt=0)
    """A stream whose remote accepts nothing for this long while data waits is reset."""
    socket_buffer: int = Field(default=32 << 20, ge=65536)
    """SO_RCVBUF/SO_SNDBUF asked for on the listen sockets (upstream: 32 MiB)."""
    replay_cache: str | None = None
    """File that keeps the replay cache across restarts (spec §9.2), so a first message
    captured before a restart is not answered after it. ``ostp-server run`` defaults to
    ``<config name>.replay-cache`` beside the config file; a relative path is relative to the
    config file. Without a cache from the previous run (first start, file lost or unwritable),
    first messages older than the start time minus 30 s are refused instead."""
    tcp: bool = True
    """Also listen on TCP on every listen address (xHTTP ``/stream``, ``/wss``, Reality;
    spec §10.6), as upstream does."""
    reality: RealityConfig | None = None
    """Reality on the TCP port, and the real site (``dest``) behind it."""
    tcp_rate_limit: int = Field(default=10, ge=0)
    """New TCP connections accepted per client IP per ``tcp_rate_window`` (spec §10.6: 10 per
    10 s); more are closed at once. 0 turns the limit off (e.g. behind a local reverse proxy)."""
    tcp_rate_window: float = Field(default=10.0, gt=0)
    tcp_handshake_timeout: float = Field(default=10.0, gt=0)
    """Seconds a TCP peer has to complete its request; then it is relayed to ``dest`` (or
    closed)."""
    tcp_resume_grace: float = Field(default=30.0, ge=0)
    """When a session's TCP connection ends, the session waits this long for the client to
    continue it on a new connection (roaming, as upstream allows) before it is ended."""
    metrics: MetricsConfig | None = None
    """Prometheus endpoint (``{"listen": "127.0.0.1:9100"}``); absent: none."""
    extensions: bool = True
    """Answer ostp-py clients' extension hello (per-stream flow control, docs/flow-control.md).
    Off, the server behaves towards every client as an upstream server does."""
    log_level: str = "info"
    debug: bool = False
    """Upstream's switch; same as ``"log_level": "debug"``."""

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _listen_valid(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one listen address is needed")
        for item in v:
            host, _port = parse_host_port(item, allow_port_zero=True)  # 0: the system picks
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{item!r}: listen on an IP address, not a name") from None
        return v

    @field_validator("access_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"key": k} if isinstance(k, str) else k for k in v]
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = v.lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return level

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(item, allow_port_zero=True) for item in self.listen]

    def key_strings(self) -> list[str]:
        return [u.key.get_secret_value() for u in self.access_keys]

    def key_labels(self) -> list[str]:
        """A log-safe label per key: the user's name, else ``key#N``."""
        return [u.name or f"key#{i}" for i, u in enumerate(self.access_keys)]

    @property
    def reality_enabled(self) -> RealityConfig | None:
        """The Reality block if it is enabled."""
        return self.reality if self.reality is not None and self.reality.enabled else None

    def ignored_keys(self) -> list[str]:
        """Top-level keys present in the file that this server does not use."""
        return sorted((self.model_extra or {}).keys())

    @property
    def effective_log_level(self) -> str:
        return "debug" if self.debug else self.log_level


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config_text(text: str) -> ServerConfig:
    """Parse the JSON text of a config file; raise :class:`ConfigError` with clear messages."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a JSON object")
    try:
        return ServerConfig.model_validate(raw)
    except ValidationError as e:
        issues = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(issues) from None


def load_config(path: str | Path) -> ServerConfig:
    """Read a config file; ``replay_cache`` is made absolute (default: beside the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    config = parse_config_text(text)
    base = path.absolute().parent
    cache = Path(config.replay_cache) if config.replay_cache else Path(f"{path.stem}.replay-cache")
    return config.model_copy(update={"replay_cache": str(base / cache)})
