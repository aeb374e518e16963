"""GNOME (and GNOME-based desktops): the ``org.gnome.system.proxy`` gsettings schema.

Values are kept as GVariant text exactly as ``gsettings get`` prints them, which ``gsettings
set`` parses back unchanged. A key whose value equals the schema default (as seen through
``GSETTINGS_BACKEND=memory``, which has no user values) is recorded as absent and restored with
``gsettings reset``, so an untouched key goes back to "not set" rather than to a pinned copy of
today's default. (The CLI cannot tell "unset" from "explicitly set to the default"; both give the
same effective value.)
"""

from __future__ import annotations

import ipaddress
import shutil

from .backend import ProxyTarget, SystemProxyError, SystemProxyUnavailable, Values
from .runner import CommandRunner, SubprocessRunner

SCHEMA = "org.gnome.system.proxy"

# Managed keys as "<schema suffix>/<key>", in apply order; mode (the switch) comes last.
KEYS: tuple[str, ...] = (
    "http/host",
    "http/port",
    "https/host",
    "https/port",
    "socks/host",
    "socks/port",
    "ignore-hosts",
    "mode",
)


def gvariant_string(text: str) -> str:
    """GVariant text for a string (``'...'`` with ``\\`` and ``'`` escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def gvariant_string_list(items: tuple[str, ...] | list[str]) -> str:
    if not items:
        return "@as []"
    return "[" + ", ".join(gvariant_string(i) for i in items) + "]"


def ignore_hosts(bypass: tuple[str, ...]) -> list[str]:
    """GNOME takes host names, ``*`` wildcards, addresses and CIDR networks as they are."""
    out: list[str] = []
    for entry in bypass:
        if entry == "<local>":
            continue  # WinINet-only notion
        try:
            # normalise "10.0.0.0/8"; keep plain addresses plain
            net = ipaddress.ip_network(entry, strict=False)
            out.append(entry if "/" not in entry else str(net))
        except ValueError:
            out.append(entry)
    return out


def _split_key(key: str) -> tuple[str, str]:
    if "/" in key:
        child, name = key.split("/", 1)
        return f"{SCHEMA}.{child}", name
    return SCHEMA, key


class GnomeBackend:
    """``gsettings``-based backend; works with any GSettings backend (dconf, keyfile...)."""

    name = "gnome"
    switch_key = "mode"

    def __init__(self, runner: CommandRunner | None = None, gsettings: str = "gsettings") -> None:
        self._run = runner if runner is not None else SubprocessRunner()
        self._gsettings = gsettings

    def check(self) -> None:
        if shutil.which(self._gsettings) is None:
            raise SystemProxyUnavailable("gsettings is not installed (package libglib2.0-bin)")
        try:
            self._run([self._gsettings, "get", SCHEMA, "mode"])
        except SystemProxyError as exc:
            raise SystemProxyUnavailable(
                f"schema {SCHEMA} is not usable (package gsettings-desktop-schemas): {exc}"
            ) from None

    def _list(self, extra_env: dict[str, str] | None = None) -> dict[str, str]:
        out = self._run([self._gsettings, "list-recursively", SCHEMA], extra_env)
        values: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if len(parts) != 3:
                continue
            schema, key, value = parts
            suffix = schema[len(SCHEMA) + 1 :] if schema != SCHEMA else ""
            values[f"{suffix}/{key}" if suffix else key] = value
        return values

    def read(self) -> dict[str, str | None]:
        current = self._list()
        defaults = self._list({"GSETTINGS_BACKEND": "memory"})
        result: dict[str, str | None] = {}
        for key in KEYS:
            if key not in current:
                raise SystemProxyError(f"gsettings has no key {key} in {SCHEMA}")
            result[key] = None if current[key] == defaults.get(key) else current[key]
        return result

    def mismatches(self, expected: Values) -> list[str]:
        current = self._list()
        defaults = self._list({"GSETTINGS_BACKEND": "memory"})
        wrong = []
        for key, value in expected.items():
            effective = defaults.get(key) if value is None else value
            if current.get(key) != effective:
                wrong.append(key)
        return wrong

    def desired(self, target: ProxyTarget) -> dict[str, str | None]:
        host = gvariant_string(target.host)
        port = str(target.port)
        return {
            "http/host": host,
            "http/port": port,
            "https/host": host,
            "https/port": port,
            "socks/host": host,
            "socks/port": port,
            "ignore-hosts": gvariant_string_list(ignore_hosts(target.bypass)),
            "mode": "'manual'",
        }

    def write(self, values: Values) -> None:
        for key, value in values.items():
            schema, name = _split_key(key)
            if value is None:
                self._run([self._gsettings, "reset", schema, name])
            else:
                self._run([self._gsettings, "set", schema, name, value])
        # gsettings/dconf notify running applications themselves.

    def is_enabled(self, values: Values) -> bool:
        return values.get("mode") == "'manual'"
