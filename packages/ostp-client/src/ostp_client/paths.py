"""Where the client looks for its config file when no `-c` is given.

Search order (the first file that exists wins):

1. `./config.json` in the current directory (what a checkout or a hand-made setup uses);
2. the user config file: `$XDG_CONFIG_HOME/ostp-client/config.json` (default
   `~/.config/ostp-client/config.json`) on Linux and other Unix systems,
   `%APPDATA%\\ostp-client\\config.json` on Windows, and
   `~/Library/Application Support/ostp-client/config.json` on macOS.

`ostp-client run --link URL` and `ostp-client import URL` (without `-o`) write the user config
file, so the next plain `ostp-client run` finds it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "APP_NAME",
    "LOCAL_CONFIG",
    "config_search_path",
    "find_config",
    "user_config_dir",
    "user_config_path",
]

APP_NAME = "ostp-client"
LOCAL_CONFIG = "config.json"
"""The config file in the current directory, tried first."""


def user_config_dir(
    env: Mapping[str, str] | None = None, platform: str | None = None, home: Path | None = None
) -> Path:
    """The per-user config directory of the client (not created here)."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    home = Path.home() if home is None else home
    if platform == "win32":
        appdata = env.get("APPDATA")
        base = Path(appdata) if appdata else home / "AppData" / "Roaming"
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = env.get("XDG_CONFIG_HOME", "")
        # XDG Base Directory spec: a relative path is invalid and must be ignored
        base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".config"
    return base / APP_NAME


def user_config_path(env: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The user config file (`user_config_dir() / "config.json"`)."""
    return user_config_dir(env, platform) / LOCAL_CONFIG


def config_search_path() -> list[Path]:
    """The files tried, in order, when no `-c` is given."""
    return [Path(LOCAL_CONFIG), user_config_path()]


def find_config() -> Path | None:
    """The first file of `config_search_path()` that exists, else None."""
    for candidate in config_search_path():
        if candidate.is_file():
            return candidate
    return None
