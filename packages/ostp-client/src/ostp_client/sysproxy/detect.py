"""Which backend applies here: an explicit override, the platform, then the desktop session."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from .kde import find_tools

BACKEND_ENV = "OSTP_SYSPROXY_BACKEND"
"""Environment override: ``gnome``, ``kde`` or ``windows``."""
BACKEND_NAMES = ("gnome", "kde", "windows")

# XDG_CURRENT_DESKTOP entries (lower-cased) whose proxy settings live in org.gnome.system.proxy.
GNOME_DESKTOPS = frozenset(
    {
        "gnome",
        "gnome-classic",
        "gnome-flashback",
        "ubuntu",
        "unity",
        "pop",
        "cinnamon",
        "x-cinnamon",
        "budgie",
        "budgie-desktop",
        "pantheon",
        "mate",
        "deepin",
    }
)
KDE_DESKTOPS = frozenset({"kde", "plasma"})


def detect_backend(
    environ: Mapping[str, str],
    platform: str = sys.platform,
    home: str | None = None,
    override: str | None = None,
) -> str | None:
    """Backend name for this session, or ``None`` (headless / unknown desktop).

    Order: ``override``, ``$OSTP_SYSPROXY_BACKEND``, Windows, ``XDG_CURRENT_DESKTOP`` (a
    colon-separated list), ``DESKTOP_SESSION``; when neither is set (sudo clears them) the
    installed tools decide: KDE's tools plus ``~/.config/kdeglobals`` of ``home``, else gsettings.
    """
    choice = override or environ.get(BACKEND_ENV)
    if choice:
        choice = choice.strip().lower()
        if choice not in BACKEND_NAMES:
            raise ValueError(f"unknown system proxy backend {choice!r}; use one of {BACKEND_NAMES}")
        return choice
    if platform == "win32":
        return "windows"
    desktops = [d.strip().lower() for d in environ.get("XDG_CURRENT_DESKTOP", "").split(":")]
    desktops += [environ.get("DESKTOP_SESSION", "").strip().lower().rsplit("/", 1)[-1]]
    for desktop in desktops:
        if desktop in KDE_DESKTOPS or desktop.startswith("plasma"):
            return "kde"
        if desktop in GNOME_DESKTOPS or desktop.startswith("gnome"):
            return "gnome"
    if any(desktops):
        return None  # a desktop we do not know (XFCE, LXQt, ...): do not guess
    if home is not None and find_tools() and (Path(home) / ".config" / "kdeglobals").exists():
        return "kde"
    if shutil.which("gsettings") and environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return "gnome"
    return None
