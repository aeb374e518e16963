"""The service manager's notification protocol (sd_notify(3)), without libsystemd.

A unit with `Type=notify` hands the daemon `$NOTIFY_SOCKET`: an `AF_UNIX` datagram socket
(a path, or an abstract name written with a leading `@`). Each datagram is newline-separated
`KEY=VALUE` assignments: `READY=1` once the service accepts work, `RELOADING=1` (with
`MONOTONIC_USEC=`) then `READY=1` around a reload, `STOPPING=1` when it begins to stop,
`WATCHDOG=1` every half `$WATCHDOG_USEC`, and `STATUS=` text for `systemctl status`.

Without `$NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed send is
logged once and never raised: notifications must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from ostp_client.running import RunningDaemon

__all__ = ["Notifier", "daemon_status_text", "get_notifier"]

logger = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0
"""Seconds between checks whether the STATUS text changed."""


class Notifier:
    """Sends sd_notify messages to `address` (None: a no-op notifier)."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None."""
        self._clock = clock
        self._sock: socket.socket | None = None
        self._failed = False
        self._stopping_sent = False
        self._status = ""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through `NOTIFY_SOCKET` / `WATCHDOG_USEC`."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        text = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if text.isdigit() and int(text) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(text)
        return cls(address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; False when not sent."""
        if self.address is None or self._failed:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # abstract namespace (Linux)
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, target)
        except BlockingIOError:
            logger.debug("the service manager's notify socket is full; message dropped")
            return False
        except OSError as exc:
            self._failed = True
            logger.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *self._status_line(status))

    def reloading(self) -> None:
        if self.enabled:
            usec = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, as sd_notify(3) asks
            self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        """STATUS= when `text` differs from the last one sent."""
        if text != self._status:
            self.notify(*self._status_line(text))

    def _status_line(self, text: str | None) -> list[str]:
        if text is None:
            return []
        self._status = text
        return [f"STATUS={text}"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, daemon: RunningDaemon, *, task_status: TaskStatus[None]) -> None:
        """READY=1 now (the caller knows the daemon serves), then STATUS and WATCHDOG pings
        until cancelled, STOPPING=1 at the end."""
        self.ready(daemon_status_text(daemon))
        task_status.started()
        if not self.enabled:
            return
        try:
            period = STATUS_INTERVAL
            if self.watchdog_interval is not None:
                period = min(period, self.watchdog_interval)
            next_ping = self._clock()
            while True:
                now = self._clock()
                if self.watchdog_interval is not None and now >= next_ping:
                    # a ping proves the event loop turns; a stuck loop sends none and
                    # systemd restarts the service (WatchdogSec=)
                    self.notify("WATCHDOG=1")
                    next_ping = now + self.watchdog_interval
                self.status(daemon_status_text(daemon))
                await anyio.sleep(period)
        finally:
            self.stopping()


def daemon_status_text(daemon: RunningDaemon) -> str:
    """One line for `systemctl status`: each outbound's state and the live connections."""
    parts = []
    for tag, outbound in daemon.outbounds.items():
        try:
            state: str | None = outbound.status().state
        except Exception:  # a broken status() must not stop the notifier
            state = None
        if state is not None:
            parts.append(f"{tag} {state}")
    parts.append(f"{len(daemon.registry.live)} connection(s)")
    return "; ".join(parts)


_notifier: Notifier | None = None


def get_notifier() -> Notifier:
    """The process's notifier (from the environment at first use)."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier.from_environment()
    return _notifier
