"""Share links (spec §10.9): `ostp://KEY@HOST:PORT?...` to an `ostp` outbound or a whole config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from pydantic import (
    ValidationError,
)

from ostp_client.config.models import (
    BlockOutboundConfig,
    ClientConfig,
    DirectOutboundConfig,
    LocalProxyInboundConfig,
    OstpOutboundConfig,
    RoutingConfig,
)
from ostp_proto.address import format_host_port, parse_host_port

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
    data: dict[str, Any] = {
        "tag": tag,
        "server": format_host_port(parsed.host, parsed.port),
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
