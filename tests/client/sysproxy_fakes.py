"""Fakes and fixtures helpers for the system proxy tests."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ostp_client.sysproxy.windows import RegData
from tests.conftest import require


@dataclass
class FakeWinInet:
    """In-memory HKCU Internet Settings + InternetSetOption that records every call."""

    values: dict[str, tuple[int, RegData]] = field(default_factory=dict)
    calls: list[tuple[object, ...]] = field(default_factory=list)
    fail_on: str | None = None
    """Raise OSError when this value name is set (to test the rollback)."""

    def query_value(self, name: str) -> tuple[int, RegData] | None:
        self.calls.append(("query", name))
        return self.values.get(name)

    def set_value(self, name: str, reg_type: int, data: RegData) -> None:
        self.calls.append(("set", name, reg_type, data))
        if name == self.fail_on:
            raise PermissionError(5, "Access is denied")
        self.values[name] = (reg_type, data)

    def delete_value(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.values.pop(name, None)

    def internet_set_option(self, option: int) -> None:
        self.calls.append(("option", option))

    def writes(self) -> list[tuple[object, ...]]:
        """Every call except the reads."""
        return [c for c in self.calls if c[0] != "query"]


def require_tools(*tools: str) -> None:
    """Skip (fail under CI=true) when a system tool the test needs is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    require(
        not missing,
        f"needs {', '.join(missing)} (apt-get install libkf5config-bin "
        "gsettings-desktop-schemas libglib2.0-bin)",
    )


def isolated_env(tmp: Path) -> dict[str, str]:
    """An environment whose gsettings/kioslaverc live under ``tmp`` only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XDG_", "DBUS_", "SUDO_", "OSTP_", "KDE_", "GSETTINGS_"))
        and k not in ("DESKTOP_SESSION", "HOME")
    }
    for sub in ("home", "config", "state", "runtime"):
        (tmp / sub).mkdir(mode=0o700, exist_ok=True)
    env.update(
        HOME=str(tmp / "home"),
        XDG_CONFIG_HOME=str(tmp / "config"),
        XDG_STATE_HOME=str(tmp / "state"),
        XDG_RUNTIME_DIR=str(tmp / "runtime"),
        GSETTINGS_BACKEND="keyfile",
    )
    return env


def read_ini(path: Path) -> dict[str, dict[str, str]]:
    """Groups and keys of a GKeyFile/KConfig file as written (no defaults involved)."""
    if not path.exists():
        return {}
    parser = configparser.RawConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return {s: dict(parser.items(s)) for s in parser.sections() if parser.items(s)}


KIOSLAVERC = ("config", "kioslaverc")
GSETTINGS_KEYFILE = ("config", "glib-2.0", "settings", "keyfile")


def gsettings(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        ["gsettings", *args], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout


def kwrite(env: dict[str, str], key: str, value: str) -> None:
    subprocess.run(
        ["kwriteconfig5", "--file", "kioslaverc", "--group", "Proxy Settings", "--key", key, value],
        env=env,
        check=True,
        timeout=30,
    )


def customise_gnome(env: dict[str, str]) -> None:
    # A user with their own (switched-off) corporate proxy; socks/https left at defaults.
    gsettings(env, "set", "org.gnome.system.proxy.http", "host", "corp-proxy.example")
    gsettings(env, "set", "org.gnome.system.proxy.http", "port", "3128")
    gsettings(env, "set", "org.gnome.system.proxy", "ignore-hosts", "['*.corp.example', \"it's\"]")
    gsettings(env, "set", "org.gnome.system.proxy", "mode", "auto")
    gsettings(env, "set", "org.gnome.system.proxy", "autoconfig-url", "http://wpad/p.pac")


def customise_kde(env: dict[str, str]) -> None:
    kwrite(env, "ProxyType", "2")
    kwrite(env, "httpProxy", "http://corp-proxy.example 3128")
    kwrite(env, "NoProxyFor", "*.corp.example,-weird value")
    kwrite(env, "ReversedException", "true")
