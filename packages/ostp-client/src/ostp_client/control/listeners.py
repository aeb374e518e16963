"""Where the control server listens: a Unix socket (checked for a live daemon before it is
replaced), or on Windows a named pipe wrapped as an anyio byte stream."""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from ostp_client.control import pipes
from ostp_client.control.protocol import (
    MAX_LINE,
    Hello,
    ProtocolError,
    parse_server_message,
)
from ostp_client.inbounds.base import StartError, os_reason

__all__ = ["PipeByteStream", "PipeListener", "open_control_listener", "open_pipe_listener"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# listener


def _prepare_unix_path(path: Path) -> bool:
    """Create the socket's directory owner-only; refuse one that another user owns.

    True when a socket file is already there (live or stale).
    """
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    info = directory.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to another user; not using it")
    if (path.exists() or path.is_symlink()) and not stat.S_ISSOCK(path.lstat().st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    return path.exists()


HELLO_TIMEOUT = 2.0
"""Seconds to wait for the Hello of a daemon found at our control socket (for its pid)."""


def _hello_pid(line: bytes) -> int | None:
    try:
        message = parse_server_message(line)
    except ProtocolError:
        return None
    return message.pid if isinstance(message, Hello) and message.pid > 0 else None


def _in_use(path: str, pid: int | None) -> StartError:
    who = f"a running daemon (pid {pid})" if pid else "another process"
    return StartError(
        f"control socket {path} is in use by {who}; stop it or set control.socket",
        errno.EADDRINUSE,
    )


async def _refuse_if_live(path: Path) -> None:
    """Raise `StartError` unless the socket file at `path` is stale.

    Stale means nobody listens: connecting is refused (ECONNREFUSED). A daemon that answers
    is named by its pid; any other outcome (EACCES, a full backlog...) cannot prove the
    socket stale, so it is left alone too.
    """
    try:
        stream = await anyio.connect_unix(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return
    except OSError as exc:
        raise StartError(
            f"control socket {path} may be in use (connecting to it: {os_reason(exc)}); "
            "stop the daemon that uses it or set control.socket",
            exc.errno,
        ) from exc
    pid = None
    unanswered = (
        anyio.EndOfStream,
        anyio.IncompleteRead,
        anyio.DelimiterNotFound,
        anyio.BrokenResourceError,
        OSError,
    )
    async with stream:
        with anyio.move_on_after(HELLO_TIMEOUT), suppress(*unanswered):
            line = await BufferedByteReceiveStream(stream).receive_until(b"\n", MAX_LINE)
            pid = _hello_pid(line)
    raise _in_use(str(path), pid)


async def open_control_listener(path: str) -> anyio.abc.Listener[anyio.abc.ByteStream]:
    """Listen at `path`: a Unix socket (mode 0600 in a 0700 directory) or, on Windows, a pipe.

    Raises `StartError` (one line) when it cannot, also when another daemon serves `path`;
    a stale socket file (its daemon died) is replaced.
    """
    if sys.platform == "win32" or pipes.is_pipe_path(path):
        return await open_pipe_listener(path)
    sock_path = Path(path)
    try:
        exists = _prepare_unix_path(sock_path)
    except OSError as exc:
        raise StartError(f"control socket {path}: {os_reason(exc)}", exc.errno) from exc
    if exists:
        await _refuse_if_live(sock_path)
        with suppress(FileNotFoundError):
            os.unlink(sock_path)  # stale socket of a daemon that did not clean up
    try:
        return await anyio.create_unix_listener(sock_path, mode=0o600)
    except OSError as exc:
        raise StartError(
            f"control socket {path} cannot listen: {os_reason(exc)}", exc.errno
        ) from exc


# --------------------------------------------------------------------------------------------
# named pipes (Windows): the same protocol handling over `control.pipes`' blocking pipe ends

MAX_PIPE_CLIENTS = 16
"""Clients served at once over a pipe; more wait in the client's connect (ERROR_PIPE_BUSY)."""
PIPE_READ_SIZE = 65536


async def open_pipe_listener(path: str) -> PipeListener:
    r"""Serve the pipe ``path`` (``\\.\pipe\NAME``), owner-only (see `control.pipes`).

    Raises `StartError` like `open_control_listener`, naming the daemon that serves ``path``.
    """
    if not pipes.is_pipe_path(path):
        raise StartError(
            f"control socket {path}: on Windows, control.socket must be a named pipe like"
            f" {_PIPE_EXAMPLE}"
        )
    try:
        return PipeListener(pipes.create_pipe_server(path))
    except FileExistsError as exc:
        raise _in_use(path, await _pipe_daemon_pid(path)) from exc
    except OSError as exc:
        raise StartError(
            f"control socket {path} cannot listen: {os_reason(exc)}", exc.errno
        ) from exc


async def _pipe_daemon_pid(path: str) -> int | None:
    """The pid in the Hello of the daemon serving pipe ``path``; None if it says none."""
    opened: list[pipes.PipeConnection] = []

    def ask() -> int | None:
        connection = pipes.connect_pipe(path, HELLO_TIMEOUT)
        opened.append(connection)
        data = b""
        while b"\n" not in data and len(data) < MAX_LINE:
            chunk = connection.read(PIPE_READ_SIZE)
            if not chunk:
                break
            data += chunk
        return _hello_pid(data.partition(b"\n")[0])

    try:
        with anyio.move_on_after(HELLO_TIMEOUT):
            return await anyio.to_thread.run_sync(ask, abandon_on_cancel=True)
    except OSError:  # not ours, gone meanwhile...
        return None
    finally:
        for connection in opened:
            connection.close()  # also ends a read the timeout abandoned
    return None


_PIPE_EXAMPLE = pipes.PIPE_PREFIX + "ostp-client-NAME"


class PipeByteStream(anyio.abc.ByteStream):
    """A connected pipe end as an anyio byte stream; its blocking calls run in worker threads.

    A call that is cancelled cancels the pipe's I/O (the abandoned thread returns at once) and
    leaves the stream broken: a control client is dropped, not resumed.
    """

    def __init__(self, connection: pipes.PipeConnection, limiter: anyio.CapacityLimiter) -> None:
        self._connection = connection
        self._limiter = limiter
        self._closed = False
        self._broken = False

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken:
            raise anyio.BrokenResourceError
        try:
            return await anyio.to_thread.run_sync(
                function, *args, abandon_on_cancel=True, limiter=self._limiter
            )
        except anyio.get_cancelled_exc_class():
            self._broken = True
            self._connection.cancel()
            raise
        except OSError as exc:
            self._broken = True
            raise anyio.BrokenResourceError from exc

    async def receive(self, max_bytes: int = PIPE_READ_SIZE) -> bytes:
        data: bytes = await self._call(self._connection.read, max_bytes)
        if not data:
            # also when another task closed the stream meanwhile (a subscription whose send
            # failed): the reading loop ends as at EOF rather than with an error
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        await self._call(self._connection.write, bytes(item))

    async def send_eof(self) -> None:
        raise NotImplementedError("a named pipe has no half-close")

    async def aclose(self) -> None:
        # synchronous on purpose: anyio.aclose_forcefully calls this in a cancelled scope
        if not self._closed:
            self._closed = True
            self._connection.close()


class PipeListener(anyio.abc.Listener[anyio.abc.ByteStream]):
    """Accepts pipe clients one instance at a time, at most `max_clients` served at once."""

    def __init__(self, server: pipes.PipeServer, *, max_clients: int = MAX_PIPE_CLIENTS) -> None:
        self._server = server
        self._slots = anyio.Semaphore(max_clients)
        # own threads, so that idle clients' blocked reads never starve anyio's default pool
        self._limiter = anyio.CapacityLimiter(2 * max_clients + 1)
        self._closed = False

    async def _accept(self) -> pipes.PipeConnection:
        try:
            connection: pipes.PipeConnection = await anyio.to_thread.run_sync(
                self._server.accept, abandon_on_cancel=True, limiter=self._limiter
            )
        except anyio.get_cancelled_exc_class():
            self._server.cancel()
            raise
        return connection

    async def serve(
        self,
        handler: Callable[[anyio.abc.ByteStream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        if task_group is None:
            async with anyio.create_task_group() as tg:
                await self._serve(handler, tg)
        else:
            await self._serve(handler, task_group)

    async def _serve(
        self, handler: Callable[[anyio.abc.ByteStream], Any], tg: anyio.abc.TaskGroup
    ) -> None:
        while not self.closed:
            await self._slots.acquire()
            try:
                connection = await self._accept()
            except OSError as exc:
                self._slots.release()
                if not self.closed:  # (closed: the loop ends)
                    logger.warning("control pipe: accept failed: %s", exc)
                    await anyio.sleep(0.5)
                continue
            except BaseException:
                self._slots.release()
                raise
            tg.start_soon(self._run, handler, PipeByteStream(connection, self._limiter))

    async def _run(
        self, handler: Callable[[anyio.abc.ByteStream], Any], stream: PipeByteStream
    ) -> None:
        try:
            await handler(stream)
        finally:
            self._slots.release()
            await anyio.aclose_forcefully(stream)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        self._server.close()
