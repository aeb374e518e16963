"""The crash-safety record: what the system proxy settings were before the client changed them.

Written atomically (temporary file, fsync, rename, fsync of the directory) with owner-only
permissions BEFORE any setting changes, deleted only after a successful restore. If it exists
at start, the previous run did not restore, and its ``previous`` values are put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .backend import SystemProxyError

if sys.platform != "win32":
    import pwd

FORMAT_VERSION = 1
APP_DIR = "ostp-client"


@dataclass(frozen=True, slots=True)
class Owner:
    """The process that wrote the record, precise enough to tell a live owner after reboots."""

    pid: int
    boot_id: str | None = None
    start_ticks: str | None = None

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), _boot_id(), _start_ticks(os.getpid()))

    def is_alive(self) -> bool:
        """True only when this exact process is still running (Linux); else ``False``."""
        if self.pid == os.getpid():
            return True
        if self.boot_id is None or self.start_ticks is None or self.boot_id != _boot_id():
            return False
        return _start_ticks(self.pid) == self.start_ticks


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime), counted after the parenthesised command name; proc(5)
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True, slots=True)
class SavedState:
    """Contents of the state file."""

    backend: str
    """Backend that was changed (restore uses this one, whatever is detected later)."""
    user: str | None
    """Desktop user the settings belong to when that is not the process user (sudo)."""
    previous: dict[str, str | None]
    """Values before the change, ``None`` = absent; restored exactly."""
    applied: dict[str, str | None]
    """Values the client wrote (to tell whether the proxy is still ours)."""
    owner: Owner

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "backend": self.backend,
                "user": self.user,
                "previous": self.previous,
                "applied": self.applied,
                "owner": {
                    "pid": self.owner.pid,
                    "boot_id": self.owner.boot_id,
                    "start_ticks": self.owner.start_ticks,
                },
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> SavedState:
        try:
            raw = json.loads(text)
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported version {raw.get('version')!r}")
            owner = raw["owner"]
            state = cls(
                backend=raw["backend"],
                user=raw["user"],
                previous=dict(raw["previous"]),
                applied=dict(raw["applied"]),
                owner=Owner(owner["pid"], owner.get("boot_id"), owner.get("start_ticks")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemProxyError(f"unreadable system proxy state file: {exc}") from None
        for values in (state.previous, state.applied):
            if not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in values.items()
            ):
                raise SystemProxyError("unreadable system proxy state file: bad value types")
        if not isinstance(state.backend, str) or not isinstance(state.user, str | None):
            raise SystemProxyError("unreadable system proxy state file: bad backend/user")
        return state


def default_state_dir() -> Path:
    """Per-user state directory of the process user: ``$XDG_STATE_HOME/ostp-client``,
    ``~/.local/state/ostp-client``, or ``%LOCALAPPDATA%\\ostp-client`` on Windows."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return Path(base) / APP_DIR if base else Path.home() / "AppData" / "Local" / APP_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / APP_DIR
    # pwd rather than $HOME: under sudo, $HOME may still be the invoking user's.
    return Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".local" / "state" / APP_DIR


def default_state_path(user: str | None = None) -> Path:
    """``sysproxy.json``, or ``sysproxy-<user>.json`` for another user's desktop (sudo)."""
    name = "sysproxy.json" if user is None else f"sysproxy-{user}.json"
    return default_state_dir() / name


class StateFile:
    """Atomic, owner-only storage of one ``SavedState``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> SavedState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SystemProxyError(f"cannot read {self.path}: {exc}") from None
        return SavedState.from_json(text)

    def save(self, state: SavedState) -> None:
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            # A directory we create is owner-only; an existing one (maybe a caller's choice
            # like /tmp) keeps its mode: the file itself is 0600 either way.
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(state.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SystemProxyError(f"cannot write state file {self.path}: {exc}") from None

    def delete(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SystemProxyError(f"cannot delete state file {self.path}: {exc}") from None
        _fsync_dir(self.path.parent)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
