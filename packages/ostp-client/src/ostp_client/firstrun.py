"""A first run from a share link, and the hints `ostp-client` prints to someone new.

`ostp-client run --link 'ostp://KEY@HOST:PORT'` writes the config the link describes to the
user config file (`paths.user_config_path()`, or `-c FILE`), prints where, and runs it; the
next `ostp-client run` finds that file by itself. An existing config is never replaced by a
different one without `--force` (the same link again just runs).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ostp_client.config import ConfigError, config_from_share_link, dump_config, load_config
from ostp_client.errors import OstpClientError
from ostp_client.paths import LOCAL_CONFIG, config_search_path, find_config, user_config_path

__all__ = ["LinkConfigError", "guide_text", "no_config_text", "write_config", "write_link_config"]


class LinkConfigError(OstpClientError):
    """The link is invalid or its config cannot be written; the message says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def write_config(path: Path, text: str) -> None:
    """Write a config (it holds the access key): owner-only, parent directories created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_link_config(link: str, path: str | None, force: bool) -> tuple[Path, list[str], bool]:
    """Write the config of a share link to `path` (default: the user config file).

    Returns (path, warnings, written); `written` is False when the file already held this
    very config. Raises `LinkConfigError` (status 2 for a bad link, 1 for a file that exists
    with another config and no `force`, or cannot be written).
    """
    try:
        config, warnings = config_from_share_link(link)
    except (ValueError, ConfigError) as exc:
        raise LinkConfigError(f"invalid share link: {exc}", 2) from None
    target = Path(path) if path is not None else user_config_path()
    text = dump_config(config)
    if target.exists():
        try:
            existing, _ = load_config(target)
        except ConfigError:
            existing = None
        # compare what the files say (a loaded config also knows its folder)
        if existing is not None and dump_config(existing) == text:
            return target, warnings, False
        if not force:
            raise LinkConfigError(
                f"{target} exists with another configuration; use --force to replace it"
                " (or -c OTHER.json to write elsewhere)",
                1,
            )
    try:
        write_config(target, text)
    except OSError as exc:
        raise LinkConfigError(f"cannot write {target}: {exc.strerror or exc}", 1) from None
    return target, warnings, True


def no_config_text() -> str:
    tried = " and ".join(str(p) for p in config_search_path())
    return (
        f"no config file: looked for {tried}.\n"
        "Start from your server's share link:\n"
        "  ostp-client run --link 'ostp://KEY@HOST:PORT'\n"
        "or name a file with -c FILE."
    )


def guide_text() -> str:
    """What to do next, for `ostp-client` typed with no arguments."""
    found = find_config()
    lines = [
        "ostp-client: the OSTP client (a local SOCKS5/HTTP proxy through your OSTP server).",
        "",
    ]
    if found is None:
        lines += [
            "You have no config yet. Start from your server's share link:",
            "  ostp-client run --link 'ostp://KEY@HOST:PORT'",
            f"    writes {user_config_path()} and runs the proxy on 127.0.0.1:1088",
            "  ostp-client import 'ostp://KEY@HOST:PORT'     only writes the config",
        ]
    else:
        shown = found if found != Path(LOCAL_CONFIG) else f"./{LOCAL_CONFIG}"
        lines += [
            f"Your config: {shown}",
            "  ostp-client run                      start the proxy (Ctrl-C stops it)",
            "  ostp-client service install --user  keep it running (systemd user service)",
            '  eval "$(ostp-client proxy-env)"      point this shell at the proxy',
        ]
    dashboard = "ostp-tui" if shutil.which("ostp-tui") else "ostp-client tui"
    lines += [
        f"  {dashboard:<36} the dashboard (while the proxy runs)",
        "  ostp-client --help                   every command",
    ]
    return "\n".join(lines)


def print_guide() -> None:
    sys.stdout.write(guide_text() + "\n")
