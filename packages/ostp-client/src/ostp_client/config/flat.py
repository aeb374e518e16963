"""Upstream's flat client config (spec §10.10), converted to the native format.

Upstream's client reads one flat object (`mode`, `server`, `access_key`, `socks5_bind`, ...);
it becomes one local proxy inbound, one `ostp` outbound and exclusion rules. Error paths are
mapped back to the flat keys so a user sees the key they wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ostp_client.config.issues import ConfigError, ConfigIssue
from ostp_client.config.models import DEFAULT_MTU, DEFAULT_PROXY_PORT
from ostp_proto.address import parse_host_port


def is_flat_config(data: Mapping[str, Any]) -> bool:
    """Upstream's flat client config (spec §10.10) rather than the native format."""
    return "mode" in data or ("outbounds" not in data and "access_key" in data)


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


def flat_path(path: str, lists: Mapping[str, tuple[str, list[int]]] | None = None) -> str:
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


def convert_flat(flat: Mapping[str, Any]) -> _FlatConversion:
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
    conversion = convert_flat(flat)
    if conversion.issues:
        raise ConfigError(conversion.issues, source, conversion.warnings)
    return conversion.data, conversion.warnings
