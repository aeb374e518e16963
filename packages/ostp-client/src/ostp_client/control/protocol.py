"""The control protocol: newline-delimited JSON messages between the daemon and its clients.

This module depends on pydantic and the standard library only (no daemon runtime, no anyio),
so the dashboard, `ostp-client ctl` and third-party tools can import it alone.

Wire format (one JSON object per line, UTF-8, at most `MAX_LINE` bytes):

- On connect the server sends a `Hello` (`{"type": "hello", "protocol": 1, ...}`). A client
  that does not know `protocol` must disconnect.
- The client sends `Request`s: `{"id": 1, "method": "status", "params": {}}`. `id` is any
  JSON string or integer chosen by the client; the server echoes it.
- Every request gets exactly one `Response`: `{"type": "response", "id": 1, "ok": true,
  "result": ...}` or `{"type": "response", "id": 1, "ok": false, "error": {"code": ...,
  "message": ...}}`. Responses to different requests may interleave with events.
- `subscribe` starts a stream of `Event`s tagged with the subscription (= the request id):
  `{"type": "event", "subscription": 7, "topic": "status", "data": ...}`.

Methods (params → result):
  hello            {}                                   → Hello
  status           {}                                   → DaemonStatus
  connections      {}                                   → ConnectionList
  routes           {}                                   → RouteTable
  logs             {"limit": 200, "level": "info", "after": seq} → LogBatch
  reconnect        {"outbound": tag}                    → ActionResult
  select           {"group": tag, "outbound": member}   → ActionResult (selector groups)
  delay            {"outbound": tag, "url": optional}   → DelayResult (checks now; a group
                                                          checks every member)
  close_connection {"id": n}                            → ActionResult
  reload           {"path": optional config path}       → ReloadResult
  subscribe        {"topic": "status"|"connections"|"routes"|"logs",
                    "interval_ms": 1000, "level": "debug", "backlog": 0} → SubscribeResult
  unsubscribe      {"subscription": id}                 → ActionResult
Event data per topic: status → DaemonStatus, connections → ConnectionList,
routes → RouteTable, logs → LogBatch (new lines only, pushed as they are logged).
Integer params (limit, after, interval_ms, backlog) must be 0 or more; a bad param is answered
with the error code `invalid_params`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ostp_client.errors import OstpClientError

__all__ = [
    "LEVELS",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "TOPICS",
    "ActionResult",
    "ConnectionInfo",
    "ConnectionList",
    "DaemonStatus",
    "DelayResult",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "Hello",
    "InboundStatus",
    "LogBatch",
    "LogLine",
    "MemberStatus",
    "OutboundStatus",
    "ProtocolError",
    "ReloadResult",
    "Request",
    "Response",
    "RouteRule",
    "RouteTable",
    "SessionStatus",
    "SubscribeResult",
    "default_socket_path",
    "encode",
    "format_bytes",
    "level_at_least",
    "parse_server_message",
]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; additive fields do not bump it."""

MAX_LINE = 1 << 20
"""Longest accepted line in bytes (a status with thousands of connections fits)."""

TOPICS = ("status", "connections", "routes", "logs")
LEVELS = ("debug", "info", "warning", "error", "critical")

Topic = Literal["status", "connections", "routes", "logs"]
Level = Literal["debug", "info", "warning", "error", "critical"]
RequestId = int | str


class ErrorCode:
    """Values of `ErrorInfo.code`."""

    MALFORMED = "malformed"
    """The line was not a JSON request object."""
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    NOT_FOUND = "not_found"
    """No such outbound, connection or subscription."""
    UNSUPPORTED = "unsupported"
    """E.g. reconnect on an outbound that has no sessions."""
    INVALID_CONFIG = "invalid_config"
    """reload: the new config was refused; the running one stays."""
    INTERNAL = "internal"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def format_bytes(n: float) -> str:
    """A byte count (or rate) as people read it: `512 B`, `1.5 KiB`, ... up to GiB.

    Here because both readers of `bytes_up`/`rate_up` (`ctl` and the TUI) may import this
    module and nothing else of the client.
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def level_at_least(level: str, minimum: str) -> bool:
    """`level` is as severe as `minimum` or more (unknown levels count as info)."""
    rank = {name: i for i, name in enumerate(LEVELS)}
    return rank.get(level, 1) >= rank.get(minimum, 0)


# --------------------------------------------------------------------------------------------
# envelopes


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    daemon: str = "ostp-client"
    version: str = "unknown"
    pid: int = 0
    methods: list[str] = Field(default_factory=list)
    topics: list[str] = Field(default_factory=lambda: list(TOPICS))


class Request(_Msg):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RequestId
    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class ErrorInfo(_Msg):
    code: str
    message: str


class Response(_Msg):
    type: Literal["response"] = "response"
    id: RequestId | None
    """None when the request was too malformed to carry an id."""
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


class Event(_Msg):
    type: Literal["event"] = "event"
    subscription: RequestId
    topic: Topic
    data: Any


# --------------------------------------------------------------------------------------------
# data


class SessionStatus(_Msg):
    """One OSTP session of an outbound (several with mux)."""

    id: str
    state: str = "unknown"
    """`Idle`, `Connecting`, `Connected` for ostp sessions."""
    server: str | None = None
    rtt_ms: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    rate_up: float = 0.0
    """Bytes per second, averaged over the last sampling interval."""
    rate_down: float = 0.0
    uptime: float | None = None
    """Seconds since the session became connected; None when not connected."""
    reconnects: int = 0
    replacements: int = 0
    """Times the session was replaced by a fresh handshake because it stopped answering
    (keepalive Pings or Connects unanswered)."""
    mapped_address: str | None = None
    """The public address STUN saw, once known."""
    datagram_size: int | None = None
    """Largest datagram the session sends now (UDP payload bytes), as path MTU discovery
    found the path allows."""
    kernel_drops: int | None = None
    """Datagrams the kernel dropped because the session's socket buffer was full (the daemon
    did not read fast enough); None where the system does not say."""
    socket_buffer: int | None = None
    """The socket's receive buffer as granted by the kernel (bytes); below what was asked for
    when `net.core.rmem_max` caps it."""
    transport: str | None = None
    """How the datagrams travel: a session's `udp`, `tcp`, `wss` or `reality`; an ostp
    outbound's configured `udp`, `tcp`, `wss` or `auto`."""


class MemberStatus(_Msg):
    """One member of an outbound group, with its last check."""

    tag: str
    type: str = "unknown"
    state: str = "ready"
    usable: bool = True
    """Not known to be down (the group may use it)."""
    delay_ms: float | None = None
    """Delay of the last successful check (time to the test URL's status line)."""
    error: str | None = None
    """Why it is down: the last failed check, a dropped session, a silent server."""
    checked_at: float | None = None
    """Unix time of the last check."""
    alive: bool | None = None
    """Result of the last check; None before the first."""


class OutboundStatus(SessionStatus):
    """One outbound. `id` is its tag; `state` is `ready` for outbounds without sessions."""

    type: str = "unknown"
    sessions: list[SessionStatus] = Field(default_factory=list)
    can_reconnect: bool = False
    connections: int = 0
    """Live connections routed to it."""
    selected: str | None = None
    """Groups: the member in use."""
    chain: list[str] = Field(default_factory=list)
    """Groups: the member in use through nested groups (`["inner", "proxy-b"]`)."""
    members: list[MemberStatus] = Field(default_factory=list)
    """Groups: every member with its last check."""
    can_select: bool = False
    """A selector group: `select` chooses its member."""
    last_switch: str | None = None
    """Groups: the last change of member and why."""
    delay_ms: float | None = None
    """The last check through this outbound (`delay`), if any."""


class InboundStatus(_Msg):
    tag: str
    type: str = "unknown"
    listen: list[str] = Field(default_factory=list)
    accepted: int | None = None


class DaemonStatus(_Msg):
    state: Literal["starting", "running", "stopping"] = "running"
    version: str = "unknown"
    pid: int = 0
    uptime: float = 0.0
    config_path: str | None = None
    inbounds: list[InboundStatus] = Field(default_factory=list)
    outbounds: list[OutboundStatus] = Field(default_factory=list)
    connections_live: int = 0
    connections_closed: int = 0
    bytes_up: int = 0
    """All connections, live and closed."""
    bytes_down: int = 0
    time: float = 0.0
    """The daemon's wall clock when this was taken (for rates and ages)."""


class ConnectionInfo(_Msg):
    id: int
    inbound: str
    network: str = "tcp"
    source: str | None = None
    destination: str | None = None
    rule: int | None = None
    """Index of the routing rule that matched; None when the default outbound applied."""
    outbound: str | None = None
    via: list[str] = Field(default_factory=list)
    """Through a group: the group(s) and the member carrying it (`["auto", "proxy-b"]`)."""
    user: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    started_at: float = 0.0
    """Unix time."""


class ConnectionList(_Msg):
    connections: list[ConnectionInfo] = Field(default_factory=list)
    time: float = 0.0


class RouteRule(_Msg):
    index: int | None
    """Position in `routing.rules`; None for the default-outbound row (always last)."""
    match: str
    """Human-readable conditions, e.g. `domain_suffix=example.com port=443`."""
    outbound: str
    hits: int = 0


class RouteTable(_Msg):
    rules: list[RouteRule] = Field(default_factory=list)
    default_outbound: str = ""


class LogLine(_Msg):
    seq: int
    """Increases by one per line logged by the daemon (gaps: lines dropped from the ring)."""
    time: float
    level: str
    logger: str
    message: str


class LogBatch(_Msg):
    lines: list[LogLine] = Field(default_factory=list)
    dropped: int = 0
    """Lines that fell out of the ring before this client saw them."""


class ActionResult(_Msg):
    message: str = ""


class DelayResult(_Msg):
    """`delay`: the checks that ran, one per outbound (a group's members)."""

    outbound: str
    url: str
    results: list[MemberStatus] = Field(default_factory=list)
    selected: str | None = None
    """For a group: the member in use after the checks."""


class ReloadResult(_Msg):
    message: str = ""
    applied: list[str] = Field(default_factory=list)
    """What changed and took effect (e.g. `routing`, `log.level`)."""
    needs_restart: list[str] = Field(default_factory=list)
    """Changes that were validated but only take effect after a restart."""


class SubscribeResult(_Msg):
    subscription: RequestId
    topic: Topic


# --------------------------------------------------------------------------------------------
# codec


class ProtocolError(OstpClientError):
    """A message from the peer that is not valid control protocol."""


def encode(message: BaseModel) -> bytes:
    """One line of wire format (with the trailing newline)."""
    return message.model_dump_json().encode() + b"\n"


_SERVER_MESSAGES: dict[str, type[Hello] | type[Response] | type[Event]] = {
    "hello": Hello,
    "response": Response,
    "event": Event,
}


def parse_server_message(line: bytes) -> Hello | Response | Event:
    """Parse a line from the daemon; raise ProtocolError when it is not one."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("not a JSON object")
    model = _SERVER_MESSAGES.get(str(data.get("type")))
    if model is None:
        raise ProtocolError(f"unknown message type {data.get('type')!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(str(exc)) from None


def default_socket_path() -> str:
    """Where the daemon listens unless `control.socket` says otherwise.

    `$XDG_RUNTIME_DIR/ostp-client/control.sock`; without XDG_RUNTIME_DIR, root's is
    `/run/ostp-client/control.sock` (where the system service listens, so that `sudo
    ostp-client ctl` finds it) and other users' `/tmp/ostp-client-<uid>/control.sock` (the
    daemon checks that it owns that directory); on Windows the named pipe
    `\\\\.\\pipe\\ostp-client-<user>`.
    """
    if sys.platform == "win32":
        user = os.environ.get("USERNAME", "user")
        return rf"\\.\pipe\ostp-client-{user}"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return str(Path(runtime) / "ostp-client" / "control.sock")
    if os.getuid() == 0 and Path("/run").is_dir():
        return "/run/ostp-client/control.sock"
    return f"/tmp/ostp-client-{os.getuid()}/control.sock"  # noqa: S108 (owner checked)
