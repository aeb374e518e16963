"""KDE Plasma: the ``[Proxy Settings]`` group of ``kioslaverc``, via kwriteconfig/kreadconfig.

Absence is detected by reading each key twice with two different ``--default`` values: only a
missing key echoes the default back both times. Absent keys are restored with ``--delete``.
After writing, running KIO applications are told to reload (best effort, needs the session bus).
"""

from __future__ import annotations

import contextlib
import shutil

from .backend import ProxyTarget, SystemProxyError, SystemProxyUnavailable, Values
from .runner import CommandRunner, SubprocessRunner

FILE = "kioslaverc"
GROUP = "Proxy Settings"
PROXY_TYPE_MANUAL = "1"  # KProtocolManager::ManualProxy

# In apply order; ProxyType (the switch) comes last.
KEYS: tuple[str, ...] = (
    "httpProxy",
    "httpsProxy",
    "socksProxy",
    "NoProxyFor",
    "ReversedException",  # true would turn NoProxyFor into "proxy ONLY these"
    "ProxyType",
)

_ABSENT_PROBES = ("ostp-absent-probe-a", "ostp-absent-probe-b")

NOTIFY = (
    "dbus-send",
    "--session",
    "--type=signal",
    "/KIO/Scheduler",
    "org.kde.KIO.Scheduler.reparseSlaveConfiguration",
    "string:",
)


def no_proxy_for(bypass: tuple[str, ...]) -> str:
    """KIO's comma-separated list; it accepts names, wildcards, addresses and CIDRs."""
    return ",".join(e for e in bypass if e != "<local>")


def find_tools(version: int | None = None) -> tuple[str, str] | None:
    """(kwriteconfig, kreadconfig) for Plasma 6 or 5, preferring 6 unless ``version`` says."""
    versions = (version,) if version is not None else (6, 5)
    for v in versions:
        write, read = f"kwriteconfig{v}", f"kreadconfig{v}"
        if shutil.which(write) and shutil.which(read):
            return write, read
    return None


class KdeBackend:
    """kioslaverc backend (Plasma 5 and 6 share the file and its keys)."""

    name = "kde"
    switch_key = "ProxyType"

    def __init__(
        self, runner: CommandRunner | None = None, tool_version: int | None = None
    ) -> None:
        self._run = runner if runner is not None else SubprocessRunner()
        self._version = tool_version

    def _tools(self) -> tuple[str, str]:
        tools = find_tools(self._version)
        if tools is None:
            raise SystemProxyUnavailable(
                "kwriteconfig5/kreadconfig5 (package libkf5config-bin) or "
                "kwriteconfig6/kreadconfig6 are not installed"
            )
        return tools

    def check(self) -> None:
        self._tools()

    def _read_key(self, key: str) -> str | None:
        _, kread = self._tools()
        seen = []
        for probe in _ABSENT_PROBES:
            out = self._run(
                [kread, "--file", FILE, "--group", GROUP, "--key", key, "--default", probe]
            )
            seen.append(out[:-1] if out.endswith("\n") else out)
        if seen[0] == _ABSENT_PROBES[0] and seen[1] == _ABSENT_PROBES[1]:
            return None
        return seen[0]

    def read(self) -> dict[str, str | None]:
        return {key: self._read_key(key) for key in KEYS}

    def mismatches(self, expected: Values) -> list[str]:
        return [k for k, v in expected.items() if self._read_key(k) != v]

    def desired(self, target: ProxyTarget) -> dict[str, str | None]:
        # "scheme://host port" is the form the Plasma proxy settings page writes.
        return {
            "httpProxy": f"http://{target.url_host} {target.port}",
            "httpsProxy": f"http://{target.url_host} {target.port}",
            "socksProxy": f"socks://{target.url_host} {target.port}",
            "NoProxyFor": no_proxy_for(target.bypass),
            "ReversedException": "false",
            "ProxyType": PROXY_TYPE_MANUAL,
        }

    def write(self, values: Values) -> None:
        kwrite, _ = self._tools()
        for key, value in values.items():
            argv = [kwrite, "--file", FILE, "--group", GROUP, "--key", key]
            if value is None:
                self._run([*argv, "--delete"])
            else:
                self._run([*argv, "--", value])  # "--": a value may start with "-"
        self._notify()

    def _notify(self) -> None:
        if shutil.which(NOTIFY[0]) is None or not self._run.has_session_bus():
            return
        with contextlib.suppress(SystemProxyError):
            self._run(NOTIFY)  # best effort: new KIO processes read the file anyway

    def is_enabled(self, values: Values) -> bool:
        return values.get("ProxyType") == PROXY_TYPE_MANUAL
