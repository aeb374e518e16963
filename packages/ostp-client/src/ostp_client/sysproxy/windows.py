"""Windows: the per-user WinINet proxy (what Edge, Chrome and most applications follow).

The values live in ``HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Internet Settings``.
All registry and WinINet access goes through the small ``WinInetApi`` interface so that the
whole backend runs on any OS against a fake; ``WindowsWinInet`` is the real implementation and
imports ``winreg``/``ctypes.windll`` only when used on Windows.

Stored values are JSON ``[registry type, data]`` (bytes as hex) so the original type comes back
as well as the data; ``None`` means the value did not exist and is deleted on restore.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
from typing import Protocol

from ostp_proto.address import format_host_port

from .backend import ProxyTarget, SystemProxyError, SystemProxyUnavailable, Values

INTERNET_SETTINGS = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
REG_SZ = 1
REG_BINARY = 3
REG_DWORD = 4
INTERNET_OPTION_REFRESH = 37  # wininet.h
INTERNET_OPTION_SETTINGS_CHANGED = 39  # wininet.h

# In apply order; ProxyEnable (the switch) comes last.
KEYS: tuple[str, ...] = (
    "ProxyServer",
    "ProxyOverride",
    "AutoConfigURL",  # a PAC URL takes precedence over the manual proxy: removed while we run
    "ProxyEnable",
)

RegData = int | str | list[str] | bytes | None
_NOT_WINDOWS = "the WinINet backend needs Windows"


class WinInetApi(Protocol):
    """The registry values under ``INTERNET_SETTINGS`` (HKCU) plus ``InternetSetOption``."""

    def query_value(self, name: str) -> tuple[int, RegData] | None:
        """``(type, data)`` of a value, or ``None`` when it does not exist."""
        ...

    def set_value(self, name: str, reg_type: int, data: RegData) -> None: ...

    def delete_value(self, name: str) -> None:
        """Delete a value; deleting a missing value is not an error."""
        ...

    def internet_set_option(self, option: int) -> None:
        """``InternetSetOptionW(NULL, option, NULL, 0)``; raises ``OSError`` on failure."""
        ...


class WindowsWinInet:
    """The real ``WinInetApi`` (Windows only; modules imported on first use)."""

    def query_value(self, name: str) -> tuple[int, RegData] | None:
        if sys.platform == "win32":
            import winreg  # noqa: PLC0415 - Windows only

            with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, INTERNET_SETTINGS) as key:
                try:
                    data, reg_type = winreg.QueryValueEx(key, name)
                except FileNotFoundError:
                    return None
            return reg_type, data
        raise SystemProxyUnavailable(_NOT_WINDOWS)

    def set_value(self, name: str, reg_type: int, data: RegData) -> None:
        if sys.platform == "win32":
            import winreg  # noqa: PLC0415 - Windows only

            access = winreg.KEY_SET_VALUE
            with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, INTERNET_SETTINGS, 0, access) as k:
                winreg.SetValueEx(k, name, 0, reg_type, data)
            return
        raise SystemProxyUnavailable(_NOT_WINDOWS)

    def delete_value(self, name: str) -> None:
        if sys.platform == "win32":
            import winreg  # noqa: PLC0415 - Windows only

            access = winreg.KEY_SET_VALUE
            with (
                winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, INTERNET_SETTINGS, 0, access) as k,
                contextlib.suppress(FileNotFoundError),
            ):
                winreg.DeleteValue(k, name)
            return
        raise SystemProxyUnavailable(_NOT_WINDOWS)

    def internet_set_option(self, option: int) -> None:
        if sys.platform == "win32":
            import ctypes  # noqa: PLC0415 - windll exists on Windows only

            if not ctypes.windll.wininet.InternetSetOptionW(None, option, None, 0):
                raise ctypes.WinError()
            return
        raise SystemProxyUnavailable(_NOT_WINDOWS)


def encode(reg_type: int, data: RegData) -> str:
    if isinstance(data, bytes):
        return json.dumps([reg_type, data.hex(), "hex"])
    return json.dumps([reg_type, data])


def decode(text: str) -> tuple[int, RegData]:
    try:
        item = json.loads(text)
        reg_type = item[0]
        data = bytes.fromhex(item[1]) if len(item) == 3 and item[2] == "hex" else item[1]
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise SystemProxyError(f"bad saved registry value {text!r}: {exc}") from None
    if not isinstance(reg_type, int) or not isinstance(data, int | str | list | bytes | None):
        raise SystemProxyError(f"bad saved registry value {text!r}")
    return reg_type, data


def proxy_override(bypass: tuple[str, ...]) -> str:
    """WinINet bypass list: ``;``-separated names with ``*`` wildcards (no CIDR syntax).

    An IPv4 network becomes octet wildcards (``10.0.0.0/8`` -> ``10.*``; ``172.16.0.0/12`` ->
    ``172.16.*`` ... ``172.31.*``); an IPv6 host becomes ``[addr]``; other IPv6 networks have no
    wildcard form and are skipped.
    """
    out: list[str] = []
    for entry in bypass:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            out.append(entry)  # host name, wildcard or <local>
            continue
        if isinstance(net, ipaddress.IPv6Network):
            if net.prefixlen == 128:
                out.append(f"[{net.network_address}]")
            continue
        if net.prefixlen == 32:
            out.append(str(net.network_address))
            continue
        octets = -(-net.prefixlen // 8)  # round the prefix up to whole octets
        subnets = [net] if net.prefixlen % 8 == 0 else net.subnets(new_prefix=octets * 8)
        for sub in subnets:
            head = str(sub.network_address).split(".")[:octets]
            out.append(".".join([*head, "*"]))
    return ";".join(out)


class WindowsBackend:
    """WinINet per-user proxy backend."""

    name = "windows"
    switch_key = "ProxyEnable"

    def __init__(self, api: WinInetApi | None = None) -> None:
        self._api = api if api is not None else WindowsWinInet()

    def check(self) -> None:
        if isinstance(self._api, WindowsWinInet) and sys.platform != "win32":
            raise SystemProxyUnavailable(_NOT_WINDOWS)

    def read(self) -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        for key in KEYS:
            try:
                found = self._api.query_value(key)
            except OSError as exc:
                raise SystemProxyError(f"cannot read {key}: {exc}") from None
            result[key] = None if found is None else encode(*found)
        return result

    def mismatches(self, expected: Values) -> list[str]:
        current = self.read()
        return [k for k, v in expected.items() if current.get(k) != v]

    def desired(self, target: ProxyTarget) -> dict[str, str | None]:
        # http= and https= only: WinINet speaks SOCKS4 for socks=, and ours is SOCKS5+HTTP.
        hostport = format_host_port(target.host, target.port)
        server = f"http={hostport};https={hostport}"
        return {
            "ProxyServer": encode(REG_SZ, server),
            "ProxyOverride": encode(REG_SZ, proxy_override(target.bypass)),
            "AutoConfigURL": None,
            "ProxyEnable": encode(REG_DWORD, 1),
        }

    def write(self, values: Values) -> None:
        try:
            for key, value in values.items():
                if value is None:
                    self._api.delete_value(key)
                else:
                    self._api.set_value(key, *decode(value))
            # Running WinINet clients re-read the registry only when told to.
            self._api.internet_set_option(INTERNET_OPTION_SETTINGS_CHANGED)
            self._api.internet_set_option(INTERNET_OPTION_REFRESH)
        except OSError as exc:
            raise SystemProxyError(f"cannot change the WinINet proxy: {exc}") from None

    def is_enabled(self, values: Values) -> bool:
        raw = values.get("ProxyEnable")
        return raw is not None and decode(raw)[1] == 1
