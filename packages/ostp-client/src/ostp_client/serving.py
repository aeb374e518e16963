"""Accept loops and contained tasks: what keeps one connection's failure from ending the daemon.

Every task the daemon starts per connection (a proxy client, a control client, a TUN flow) runs
under `run_contained`: whatever it raises is logged (connection noise at debug level only) and
goes no further, so its task group and the daemon keep running.

anyio's ``Listener.serve`` ends, and cancels its task group, at the first error of
``accept()``; running out of file descriptors is such an error. `serve_listener` accepts in a
loop of its own instead: errors that concern one pending connection are skipped, and when the
process is out of descriptors (or memory) it logs one warning, leaves the waiting connections
in the listen queue, retries after a short pause and logs once when accepting works again. The
listening socket and every live connection stay as they are.
"""

from __future__ import annotations

import errno
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.stapled import MultiListener

from ostp_client.connections import is_connection_noise

if sys.platform != "win32":
    import resource  # imported now: it cannot be loaded once descriptors run out

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_PENDING_ERRNOS",
    "ACCEPT_RETRY_DELAY",
    "AcceptBackoff",
    "WarningLimit",
    "run_contained",
    "serve_listener",
]

logger = logging.getLogger(__name__)

T_Stream = TypeVar("T_Stream", bound=anyio.abc.AnyByteStream)

ACCEPT_CAPACITY_ERRNOS = frozenset(
    code
    for code in (
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        getattr(errno, "WSAEMFILE", None),
        getattr(errno, "WSAENOBUFS", None),
    )
    if code is not None
)
"""``accept()`` failed for want of descriptors or memory: wait, then try again."""

ACCEPT_PENDING_ERRNOS = frozenset(
    code
    for code in (
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.EPERM,  # a firewall rule refused this connection (Linux accept(2))
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        getattr(errno, "ENONET", None),
        getattr(errno, "WSAECONNRESET", None),
        getattr(errno, "WSAECONNABORTED", None),
    )
    if code is not None
)
"""``accept()`` failed for one pending connection only (Linux hands its network errors to
``accept()``, accept(2) "Error handling"): skip it and accept the next at once."""

ACCEPT_RETRY_DELAY = 0.1
"""Seconds between ``accept()`` attempts while the process is out of descriptors."""
WARN_INTERVAL = 60.0
"""At most one accept warning per process in this many seconds (every listener runs out at
once: one warning says it)."""


class WarningLimit:
    """At most one warning per ``interval`` seconds among those who share it."""

    def __init__(self, interval: float = WARN_INTERVAL) -> None:
        self.interval = interval
        self._last = -math.inf

    def allow(self, now: float) -> bool:
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


_PROCESS_LIMIT = WarningLimit()


def _nofile_limit() -> int | None:
    if sys.platform == "win32":  # pragma: no cover - no RLIMIT_NOFILE there
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class AcceptBackoff:
    """What one accept loop says while ``accept()`` fails for want of resources.

    The first failure of an episode is a warning (at most one per `WARN_INTERVAL` in the
    process, see `WarningLimit`), the following ones are silent; the first success after a
    warning is logged once at info level.
    """

    def __init__(self, what: str, limit: WarningLimit = _PROCESS_LIMIT) -> None:
        self.what = what
        self.limit = limit
        self.failing_since: float | None = None
        self.failures = 0
        """Failed attempts in the current episode."""
        self.episodes = 0
        """Episodes so far (for tests and status)."""
        self._warned = False

    def failed(self, exc: OSError, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures += 1
        if self.failing_since is not None:
            return
        self.failing_since = now
        self.episodes += 1
        self._warned = self.limit.allow(now)
        if not self._warned:
            logger.debug("%s: cannot accept connections: %s", self.what, exc)
            return
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            limit = _nofile_limit()
            have = f" (this process may open {limit})" if limit is not None else ""
            logger.warning(
                "%s: cannot accept connections, out of file descriptors%s: %s. Live"
                " connections go on; new ones wait in the listen queue until descriptors are"
                " free. To serve more at once, raise the limit: `ulimit -n 65536` in the shell"
                " that starts the daemon, or LimitNOFILE=65536 in its systemd unit.",
                self.what,
                have,
                exc.strerror or exc,
            )
        elif exc.errno in ACCEPT_CAPACITY_ERRNOS:
            logger.warning(
                "%s: cannot accept connections, out of memory or socket buffers: %s. Live"
                " connections go on; new ones wait in the listen queue.",
                self.what,
                exc.strerror or exc,
            )
        else:
            logger.warning("%s: accept() failed: %s; retrying", self.what, exc)

    def succeeded(self, now: float | None = None) -> None:
        if self.failing_since is None:
            return
        now = time.monotonic() if now is None else now
        log = logger.info if self._warned else logger.debug
        log(
            "%s: accepting connections again (after %.1f s, %d failed attempts)",
            self.what,
            now - self.failing_since,
            self.failures,
        )
        self.failing_since = None
        self.failures = 0


def _accept_errno(exc: BaseException) -> int | None:
    """The errno behind an accept() failure (anyio's Unix listener wraps it)."""
    if isinstance(exc, OSError):
        return exc.errno
    cause = exc.__cause__
    if isinstance(exc, anyio.BrokenResourceError) and isinstance(cause, OSError):
        return cause.errno
    return None


async def _accept_loop(
    listener: anyio.abc.Listener[T_Stream],
    handler: Callable[[T_Stream], Awaitable[Any]],
    task_group: anyio.abc.TaskGroup,
    what: str,
    backoff: AcceptBackoff,
) -> None:
    accept = getattr(listener, "accept", None)
    if accept is None:
        # Not a socket listener (the Windows control pipe): its serve() handles its errors.
        await listener.serve(lambda stream: run_contained(what, handler, stream), task_group)
        return
    while True:
        try:
            stream: T_Stream = await accept()
        except anyio.ClosedResourceError:
            return  # the listener was closed: stop serving
        except (OSError, anyio.BrokenResourceError) as exc:
            code = _accept_errno(exc)
            if code in ACCEPT_PENDING_ERRNOS:
                logger.debug("%s: a pending connection failed before accept: %r", what, exc)
                continue
            error = exc if isinstance(exc, OSError) else exc.__cause__
            if not isinstance(error, OSError):
                error = OSError(f"{exc!r}")
            # A shortage, or an error not worth ending the daemon for: wait and try again.
            backoff.failed(error)
            await anyio.sleep(ACCEPT_RETRY_DELAY)
            continue
        backoff.succeeded()
        task_group.start_soon(run_contained, what, handler, stream)


async def serve_listener(
    listener: anyio.abc.Listener[T_Stream],
    handler: Callable[[T_Stream], Awaitable[Any]],
    task_group: anyio.abc.TaskGroup,
    *,
    what: str,
) -> None:
    """Accept until cancelled (or the listener is closed), each connection's ``handler`` in
    ``task_group`` under `run_contained`. ``what`` names the listener in log lines."""
    backoff = AcceptBackoff(what)
    if isinstance(listener, MultiListener):
        async with anyio.create_task_group() as loops:
            for sub in listener.listeners:
                loops.start_soon(_accept_loop, sub, handler, task_group, what, backoff)
        return
    await _accept_loop(listener, handler, task_group, what, backoff)


async def run_contained(what: str, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Await ``func(*args)``; an exception it raises is logged and goes no further.

    Connection noise (reset, broken pipe, EOF, also inside exception groups) is logged at debug
    level, anything else with its traceback. Cancellation passes through.
    """
    try:
        await func(*args)
    except Exception as exc:
        if is_connection_noise(exc):
            logger.debug("%s: connection noise: %r", what, exc)
        else:
            logger.exception("%s: task failed (the daemon goes on)", what)
