"""The backend-neutral system proxy API and the daemon's start/stop guard."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio

from .backend import (
    DEFAULT_BYPASS,
    Backend,
    ProxyTarget,
    SystemProxyError,
    SystemProxyUnavailable,
)
from .detect import BACKEND_ENV, detect_backend
from .gnome import GnomeBackend
from .kde import KdeBackend
from .runner import SubprocessRunner, sudo_target_user
from .statefile import Owner, SavedState, StateFile, default_state_path
from .windows import WindowsBackend

STOP_TIMEOUT = 60.0  # seconds for a restore at shutdown; after that the state file remains


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    """What ``SystemProxy.status()`` found."""

    backend: str | None
    """Backend in use, ``None`` when none is available."""
    unavailable_reason: str | None
    """Why no backend could be read, if so."""
    enabled: bool
    """A manual proxy is switched on in the system settings."""
    values: dict[str, str | None] = field(default_factory=dict)
    """Current values of the managed keys (``None`` = absent/default)."""
    pending_restore: bool = False
    """A state file exists: the settings still have to be restored."""
    owner_pid: int | None = None
    """Process that wrote the state file, when that process is still running."""
    ours: bool = False
    """The current values are exactly the ones the client applied."""
    state_path: Path | None = None

    def describe(self) -> str:
        lines = [f"backend: {self.backend or 'none'}"]
        if self.unavailable_reason:
            lines.append(f"unavailable: {self.unavailable_reason}")
        lines.append(f"proxy enabled: {'yes' if self.enabled else 'no'}")
        for key, value in self.values.items():
            lines.append(f"  {key} = {'<absent>' if value is None else value}")
        if self.pending_restore:
            who = f"running ostp-client pid {self.owner_pid}" if self.owner_pid else "stale"
            lines.append(f"saved previous settings: {self.state_path} ({who})")
            lines.append(f"set by ostp-client: {'yes' if self.ours else 'no (changed since)'}")
        return "\n".join(lines)


class SystemProxy:
    """Points the desktop's proxy settings at the client and puts them back exactly.

    ``apply`` records the previous values in the state file before changing anything;
    ``restore`` writes them back and deletes the file; ``recover_stale`` does the same for a
    file left by a run that died (SIGKILL, power loss) and is a no-op otherwise.
    All methods block (subprocesses / registry); run them in a worker thread from async code.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        preferred: str | None,
        state_path: Path,
        *,
        user: str | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        self._backends = dict(backends)
        self._preferred = preferred
        self._state = StateFile(state_path)
        self._user = user
        self._unavailable = unavailable_reason

    @classmethod
    def for_this_system(
        cls,
        backend: str | None = None,
        *,
        state_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> SystemProxy:
        """Detect the backend (``backend`` or ``$OSTP_SYSPROXY_BACKEND`` override it) and,
        under sudo, target the invoking user's desktop (see ``runner``)."""
        env = dict(os.environ if environ is None else environ)
        user = sudo_target_user(env)
        runner = SubprocessRunner(user, env)
        backends: dict[str, Backend] = {
            "gnome": GnomeBackend(runner),
            "kde": KdeBackend(runner),
        }
        if sys.platform == "win32" or backend == "windows":
            backends["windows"] = WindowsBackend()
        home = user.home if user is not None else env.get("HOME")
        reason = None
        try:
            preferred = detect_backend(runner.environment, home=home, override=backend)
        except ValueError as exc:
            raise SystemProxyError(str(exc)) from None
        if preferred is None:
            reason = (
                "no supported desktop detected (GNOME, KDE or Windows); set "
                f"{BACKEND_ENV}=gnome|kde, or use http_proxy/all_proxy variables instead"
            )
        path = state_path or default_state_path(user.name if user else None)
        return cls(
            backends, preferred, path, user=user.name if user else None, unavailable_reason=reason
        )

    @property
    def state_path(self) -> Path:
        return self._state.path

    def _backend(self, name: str | None = None) -> Backend:
        name = name or self._preferred
        if name is None:
            raise SystemProxyUnavailable(self._unavailable or "no system proxy backend")
        try:
            return self._backends[name]
        except KeyError:
            raise SystemProxyUnavailable(
                f"system proxy backend {name!r} is not usable here"
            ) from None

    def status(self) -> ProxyStatus:
        saved = self._state.load()
        name = saved.backend if saved is not None else self._preferred
        owner = saved.owner.pid if saved is not None and saved.owner.is_alive() else None
        try:
            backend = self._backend(name)
            backend.check()
            values = backend.read()
            ours = saved is not None and not backend.mismatches(saved.applied)
        except SystemProxyError as exc:
            return ProxyStatus(
                name, str(exc), False, {}, saved is not None, owner, False, self._state.path
            )
        return ProxyStatus(
            backend.name,
            None,
            backend.is_enabled(values),
            values,
            saved is not None,
            owner,
            ours,
            self._state.path,
        )

    def apply(self, host: str, port: int, bypass: tuple[str, ...] = DEFAULT_BYPASS) -> None:
        """Point the system proxy at ``host:port``.

        A stale state file is recovered first, so "previous" is never our own proxy. If a live
        ostp-client process owns the state file, raise instead of fighting over the settings.
        If writing fails, the previous values are put back before the error is raised.
        """
        target = ProxyTarget(host, port, tuple(bypass))
        saved = self._state.load()
        if saved is not None:
            if saved.owner.is_alive() and saved.owner.pid != os.getpid():
                raise SystemProxyError(
                    f"the system proxy is managed by running ostp-client pid {saved.owner.pid} "
                    f"(state file {self._state.path})"
                )
            self.restore()
        backend = self._backend()
        backend.check()
        previous = backend.read()
        desired = backend.desired(target)
        # The record goes to disk before the first setting changes.
        self._state.save(SavedState(backend.name, self._user, previous, desired, Owner.current()))
        try:
            backend.write(desired)
            wrong = backend.mismatches(desired)
            if wrong:
                raise SystemProxyError(
                    f"{backend.name} proxy settings did not take effect: {', '.join(wrong)}"
                )
        except BaseException:
            with contextlib.suppress(SystemProxyError):
                self.restore()  # if this fails too, the state file stays for recover_stale()
            raise

    def restore(self) -> bool:
        """Put back the values from the state file and delete it; ``False`` if there was none.

        Raises ``SystemProxyError`` (keeping the state file) when the values did not come back.
        """
        saved = self._state.load()
        if saved is None:
            return False
        backend = self._backend(saved.backend)
        switch = backend.switch_key
        # Switch the proxy off (or back to its old mode) first, then the details.
        ordered = {k: v for k, v in saved.previous.items() if k == switch}
        ordered.update((k, v) for k, v in saved.previous.items() if k != switch)
        backend.write(ordered)
        wrong = backend.mismatches(ordered)
        if wrong:
            raise SystemProxyError(
                f"could not restore {backend.name} proxy settings {', '.join(wrong)}; "
                f"previous values kept in {self._state.path}"
            )
        self._state.delete()
        return True

    def recover_stale(self) -> bool:
        """Restore from a state file left by a run that did not restore; ``True`` if it did.

        A state file whose writer is still running (another ostp-client) is left alone.
        """
        saved = self._state.load()
        if saved is None:
            return False
        if saved.owner.is_alive() and saved.owner.pid != os.getpid():
            return False
        return self.restore()


class SystemProxyGuard:
    """Set the system proxy while the daemon runs: ``start()`` applies (after the state file is
    written), ``stop()`` restores. Usable as a plain object, a ``with`` block or an
    ``async with`` block (blocking work runs in a worker thread; the restore is shielded from
    cancellation and bounded by ``STOP_TIMEOUT``). Signal handling stays with the daemon: it
    only has to leave the block (cancel its task group) on SIGTERM/SIGINT.
    """

    def __init__(
        self,
        proxy: SystemProxy,
        host: str,
        port: int,
        bypass: tuple[str, ...] = DEFAULT_BYPASS,
    ) -> None:
        self.proxy = proxy
        self.target = ProxyTarget(host, port, tuple(bypass))

    def start(self) -> None:
        self.proxy.apply(self.target.host, self.target.port, self.target.bypass)

    def stop(self) -> None:
        self.proxy.restore()

    def __enter__(self) -> SystemProxyGuard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> SystemProxyGuard:
        # Shielded: a cancellation arriving mid-apply must not skip __aexit__'s restore.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.move_on_after(STOP_TIMEOUT, shield=True):
            await anyio.to_thread.run_sync(self.stop)
