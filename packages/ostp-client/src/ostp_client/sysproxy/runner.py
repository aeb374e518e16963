"""Running the desktop's configuration tools, as the desktop user.

When the client runs as root through ``sudo``, the proxy belongs to the user who typed sudo
(``SUDO_USER``), not to root: root's gsettings/kioslaverc are never read by that user's browser.
So the tools are run with that user's uid, gid and supplementary groups, with
``HOME``/``USER``/``LOGNAME`` set to theirs, ``XDG_RUNTIME_DIR=/run/user/<uid>`` and
``DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/<uid>/bus`` when that socket exists (dconf and
the KDE notification need the user's session bus), and any root-side ``XDG_*_HOME`` removed so
the user's own defaults apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .backend import SystemProxyError

if sys.platform != "win32":
    import pwd

TOOL_TIMEOUT = 10.0  # seconds; a wedged dconf/D-Bus must not hang shutdown

# Variables that describe root's session, not the target user's.
_USER_SPECIFIC_ENV = (
    "HOME",
    "USER",
    "LOGNAME",
    "MAIL",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
)


@dataclass(frozen=True, slots=True)
class TargetUser:
    """The user whose desktop settings are changed when that is not the current process user."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = ()


def sudo_target_user(environ: Mapping[str, str] | None = None) -> TargetUser | None:
    """The invoking user when running as root via sudo, else ``None`` (POSIX only)."""
    env = os.environ if environ is None else environ
    name = env.get("SUDO_USER")
    if sys.platform == "win32" or not name or os.geteuid() != 0 or name == "root":
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SystemProxyError(f"SUDO_USER={name!r} is not a known user") from None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return TargetUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir, groups)


def user_environment(user: TargetUser, base: Mapping[str, str]) -> dict[str, str]:
    """The environment the tools run with for ``user`` (see the module docstring)."""
    env = {k: v for k, v in base.items() if k not in _USER_SPECIFIC_ENV}
    env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    runtime = Path(f"/run/user/{user.uid}")
    if runtime.is_dir():
        env["XDG_RUNTIME_DIR"] = str(runtime)
        if (runtime / "bus").exists():
            env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={runtime / 'bus'}"
    return env


class CommandRunner(Protocol):
    """Runs one configuration tool and returns its standard output."""

    def __call__(self, argv: Sequence[str], extra_env: Mapping[str, str] | None = None) -> str:
        """Run ``argv``; raise ``SystemProxyError`` when it fails or times out."""
        ...

    def has_session_bus(self) -> bool:
        """Whether the tools see a D-Bus session bus (for best-effort notifications)."""
        ...


class SubprocessRunner:
    """Runs tools with ``subprocess``, as ``user`` when given (root via sudo)."""

    def __init__(
        self, user: TargetUser | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.user = user
        base = dict(os.environ if environ is None else environ)
        self._env = base if user is None else user_environment(user, base)

    @property
    def environment(self) -> Mapping[str, str]:
        """The environment the tools run with."""
        return self._env

    def has_session_bus(self) -> bool:
        return bool(self._env.get("DBUS_SESSION_BUS_ADDRESS"))

    def __call__(self, argv: Sequence[str], extra_env: Mapping[str, str] | None = None) -> str:
        env = dict(self._env)
        if extra_env:
            env.update(extra_env)
        user = self.user
        cwd = None if user is None else (user.home if os.path.isdir(user.home) else "/")
        try:
            done = subprocess.run(  # noqa: S603 - fixed tool names, argv list, no shell
                list(argv),
                env=env,
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else list(user.groups),
                cwd=cwd,
            )
        except FileNotFoundError:
            raise SystemProxyError(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise SystemProxyError(f"{argv[0]} did not finish within {TOOL_TIMEOUT:g} s") from None
        except OSError as exc:
            raise SystemProxyError(f"cannot run {argv[0]}: {exc}") from None
        if done.returncode != 0:
            detail = done.stderr.strip().splitlines()
            reason = detail[-1] if detail else f"exit status {done.returncode}"
            raise SystemProxyError(f"{' '.join(argv[:2])} failed: {reason}")
        return done.stdout
