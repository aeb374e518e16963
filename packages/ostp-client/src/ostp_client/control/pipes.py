r"""Windows named pipes for the control socket: blocking pipe ends that both sides wrap.

The daemon (`control.server`, anyio) and the client (`control.client`, asyncio) speak the same
newline-delimited JSON over a pipe ``\\.\pipe\ostp-client-<user>``. Both go through two small
interfaces, `PipeServer` and `PipeConnection`, whose calls block and run in worker threads;
the module functions `create_pipe_server` and `connect_pipe` pick the implementation, so tests
replace them with in-memory fakes and the real request/response code runs over those.

The Win32 implementation (ctypes, no pywin32) uses overlapped I/O, so that a read waiting for
the next request and a write of a subscription event can be pending on the same pipe at once
(synchronous I/O on one handle is serialised by Windows), and so that a blocked call can be
cancelled (``CancelIoEx``).

Owner-only access: every pipe instance is created with the security descriptor
``O:<SID>D:P(A;;GA;;;<SID>)`` (SDDL; ``<SID>`` = the user of the daemon's process token): the
owner is that user and the protected DACL has a single entry granting that user full access, so
other users, services and the network get ERROR_ACCESS_DENIED (an elevated daemon stays
reachable from the same user's unelevated shell: the DACL names the user, not a group).
``PIPE_REJECT_REMOTE_CLIENTS`` refuses SMB clients. The first instance is created with
``FILE_FLAG_FIRST_PIPE_INSTANCE``, so the daemon fails to start rather than share a name someone
else created first, and the client checks that the pipe's owner is its own user before it
sends anything, and connects with ``SECURITY_IDENTIFICATION`` (the server cannot impersonate it).
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Protocol

__all__ = [
    "PIPE_PREFIX",
    "PipeConnection",
    "PipeServer",
    "connect_pipe",
    "create_pipe_server",
    "is_pipe_path",
    "owner_only_sddl",
]

PIPE_PREFIX = "\\\\.\\pipe\\"
BUFFER_SIZE = 65536

# winerror.h
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
_GONE = (ERROR_BROKEN_PIPE, ERROR_NO_DATA, ERROR_PIPE_NOT_CONNECTED, ERROR_OPERATION_ABORTED)


def is_pipe_path(path: str) -> bool:
    r"""``\\.\pipe\...`` (any case)."""
    return path.lower().startswith(PIPE_PREFIX)


def owner_only_sddl(sid: str) -> str:
    """The security descriptor of every pipe instance (see the module docstring)."""
    return f"O:{sid}D:P(A;;GA;;;{sid})"


class PipeConnection(Protocol):
    """One connected pipe end. Calls block; `cancel()` and `close()` may come from any thread."""

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; ``b""`` once the other end is gone or after `cancel()`."""

    def write(self, data: bytes) -> None:
        """All of ``data``; `BrokenPipeError` once the other end is gone or after `cancel()`."""

    def cancel(self) -> None:
        """Make pending and later calls return at once (the connection is finished)."""

    def close(self) -> None:
        """Cancel, then release the pipe (idempotent)."""


class PipeServer(Protocol):
    """The listening side: one instance at a time waits for the next client."""

    def accept(self) -> PipeConnection:
        """Block until a client connects; `OSError` after `cancel()` or `close()`."""

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def create_pipe_server(path: str) -> PipeServer:
    """Create the first instance of pipe ``path`` (owner-only); Windows only.

    `FileExistsError` when another process already serves that name.
    """
    return _Win32PipeServer(path)


def connect_pipe(path: str, timeout: float = 5.0) -> PipeConnection:
    """Connect to pipe ``path``, waiting up to ``timeout`` while every instance is busy.

    `FileNotFoundError` when nothing serves it; `PermissionError` when it is not ours.
    """
    return _win32_connect(path, timeout)


# --------------------------------------------------------------------------------------------
# Win32 (exercised on Windows only; the logic around it is tested with fakes)

# winbase.h / winnt.h
PIPE_ACCESS_DUPLEX = 0x3
FILE_FLAG_OVERLAPPED = 0x40000000
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
PIPE_TYPE_BYTE = 0x0
PIPE_READMODE_BYTE = 0x0
PIPE_WAIT = 0x0
PIPE_REJECT_REMOTE_CLIENTS = 0x8
PIPE_UNLIMITED_INSTANCES = 255
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000
TOKEN_QUERY = 0x0008
TOKEN_USER_CLASS = 1  # TokenUser
SE_KERNEL_OBJECT = 6
OWNER_SECURITY_INFORMATION = 0x1
SDDL_REVISION_1 = 1
INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value


class _OVERLAPPED(ctypes.Structure):
    _fields_ = (
        ("Internal", ctypes.c_size_t),
        ("InternalHigh", ctypes.c_size_t),
        ("Offset", ctypes.c_uint32),
        ("OffsetHigh", ctypes.c_uint32),
        ("hEvent", ctypes.c_void_p),
    )


class _SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = (
        ("nLength", ctypes.c_uint32),
        ("lpSecurityDescriptor", ctypes.c_void_p),
        ("bInheritHandle", ctypes.c_int32),
    )


class _Win32:  # pragma: no cover - Windows only
    """kernel32 and advapi32 with the signatures used here (loaded on first use)."""

    _instance: _Win32 | None = None

    def __init__(self) -> None:
        windll: Any = getattr(ctypes, "WinDLL", None)
        if windll is None:
            raise OSError("named pipes are Windows only")
        k = windll("kernel32", use_last_error=True)
        a = windll("advapi32", use_last_error=True)
        h, dw, b, p = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32, ctypes.c_void_p
        wstr = ctypes.c_wchar_p
        signatures: list[tuple[Any, list[tuple[str, Any, list[Any]]]]] = [
            (
                k,
                [
                    ("CreateNamedPipeW", h, [wstr, dw, dw, dw, dw, dw, dw, p]),
                    ("ConnectNamedPipe", b, [h, p]),
                    ("DisconnectNamedPipe", b, [h]),
                    ("CreateFileW", h, [wstr, dw, dw, p, dw, dw, h]),
                    ("WaitNamedPipeW", b, [wstr, dw]),
                    ("ReadFile", b, [h, p, dw, p, p]),
                    ("WriteFile", b, [h, p, dw, p, p]),
                    ("GetOverlappedResult", b, [h, p, p, b]),
                    ("CancelIoEx", b, [h, p]),
                    ("CreateEventW", h, [p, b, b, wstr]),
                    ("CloseHandle", b, [h]),
                    ("LocalFree", p, [p]),
                    ("GetCurrentProcess", h, []),
                ],
            ),
            (
                a,
                [
                    ("OpenProcessToken", b, [h, dw, p]),
                    ("GetTokenInformation", b, [h, dw, p, dw, p]),
                    ("ConvertSidToStringSidW", b, [p, p]),
                    ("ConvertStringSidToSidW", b, [wstr, p]),
                    ("ConvertStringSecurityDescriptorToSecurityDescriptorW", b, [wstr, dw, p, p]),
                    ("GetSecurityInfo", dw, [h, dw, dw, p, p, p, p, p]),
                    ("EqualSid", b, [p, p]),
                ],
            ),
        ]
        for dll, functions in signatures:
            for name, restype, argtypes in functions:
                function = getattr(dll, name)
                function.restype = restype
                function.argtypes = argtypes
        self.k = k
        self.a = a

    @classmethod
    def get(cls) -> _Win32:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @staticmethod
    def error(what: str) -> OSError:
        code = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
        return OSError(code, f"{what} failed (Win32 error {code})")

    def user_sid(self) -> str:
        """The SID of the process token's user, as a string (``S-1-5-21-...``)."""
        k, a = self.k, self.a
        token = ctypes.c_void_p()
        if not a.OpenProcessToken(k.GetCurrentProcess(), TOKEN_QUERY, ctypes.byref(token)):
            raise self.error("OpenProcessToken")
        try:
            size = ctypes.c_uint32()
            a.GetTokenInformation(token, TOKEN_USER_CLASS, None, 0, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            if not a.GetTokenInformation(token, TOKEN_USER_CLASS, buffer, size, ctypes.byref(size)):
                raise self.error("GetTokenInformation")
            sid = ctypes.c_void_p.from_buffer(buffer).value  # TOKEN_USER.User.Sid
            text = ctypes.c_wchar_p()
            if not a.ConvertSidToStringSidW(ctypes.c_void_p(sid), ctypes.byref(text)):
                raise self.error("ConvertSidToStringSidW")
            try:
                return str(text.value)
            finally:
                k.LocalFree(text)
        finally:
            k.CloseHandle(token)

    def new_event(self) -> Any:
        event = self.k.CreateEventW(None, True, False, None)
        if not event:
            raise self.error("CreateEventW")
        return event


class _Win32Pipe:  # pragma: no cover - Windows only
    """An overlapped pipe handle with one event per direction."""

    def __init__(self, handle: Any, *, server: bool) -> None:
        self._w = _Win32.get()
        self._handle = handle
        self._server = server
        self._read_event = self._w.new_event()
        self._write_event = self._w.new_event()
        self._state = threading.Condition()
        self._busy = 0
        self._done = False

    def _io(self, start: Any, event: Any, what: str) -> int:
        with self._state:
            if self._done:
                raise OSError(ERROR_OPERATION_ABORTED, f"{what}: pipe closed")
            self._busy += 1
        try:
            k = self._w.k
            overlapped = _OVERLAPPED()
            overlapped.hEvent = event
            count = ctypes.c_uint32()
            if not start(ctypes.byref(overlapped)):
                code = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
                if code != ERROR_IO_PENDING:
                    raise OSError(code, f"{what} failed (Win32 error {code})")
            # waits until the operation completed or was cancelled: the buffer and OVERLAPPED
            # above stay alive until then
            if not k.GetOverlappedResult(
                self._handle, ctypes.byref(overlapped), ctypes.byref(count), True
            ):
                raise self._w.error(what)
            return int(count.value)
        finally:
            with self._state:
                self._busy -= 1
                self._state.notify_all()

    def read(self, max_bytes: int) -> bytes:
        buffer = ctypes.create_string_buffer(max_bytes)
        try:
            count = self._io(
                lambda ov: self._w.k.ReadFile(self._handle, buffer, max_bytes, None, ov),
                self._read_event,
                "ReadFile",
            )
        except OSError as exc:
            if exc.errno in _GONE:
                return b""
            raise
        return buffer.raw[:count]

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = ctypes.create_string_buffer(bytes(view[:BUFFER_SIZE]), len(view[:BUFFER_SIZE]))
            size = len(chunk)
            try:
                count = self._io(
                    lambda ov, c=chunk, n=size: self._w.k.WriteFile(self._handle, c, n, None, ov),
                    self._write_event,
                    "WriteFile",
                )
            except OSError as exc:
                if exc.errno in _GONE:
                    raise BrokenPipeError(exc.errno, "the other end closed the pipe") from None
                raise
            view = view[count:]

    def cancel(self) -> None:
        with self._state:
            self._done = True
            if self._handle is not None:
                self._w.k.CancelIoEx(self._handle, None)

    def close(self) -> None:
        self.cancel()
        with self._state:
            self._state.wait_for(lambda: self._busy == 0, timeout=5.0)
            handle, self._handle = self._handle, None
        if handle is None:
            return
        k = self._w.k
        if self._server:
            k.DisconnectNamedPipe(handle)
        k.CloseHandle(handle)
        k.CloseHandle(self._read_event)
        k.CloseHandle(self._write_event)


class _Win32PipeServer:  # pragma: no cover - Windows only
    def __init__(self, path: str) -> None:
        self._w = _Win32.get()
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        descriptor = ctypes.c_void_p()
        if not self._w.a.ConvertStringSecurityDescriptorToSecurityDescriptorW(
            owner_only_sddl(self._w.user_sid()), SDDL_REVISION_1, ctypes.byref(descriptor), None
        ):
            raise self._w.error("ConvertStringSecurityDescriptorToSecurityDescriptorW")
        self._descriptor = descriptor
        self._attributes = _SECURITY_ATTRIBUTES(
            ctypes.sizeof(_SECURITY_ATTRIBUTES), descriptor.value, 0
        )
        self._event = self._w.new_event()
        self._next = self._instance(first=True)

    def _instance(self, *, first: bool) -> Any:
        flags = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED
        if first:
            flags |= FILE_FLAG_FIRST_PIPE_INSTANCE
        handle = self._w.k.CreateNamedPipeW(
            self.path,
            flags,
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            PIPE_UNLIMITED_INSTANCES,
            BUFFER_SIZE,
            BUFFER_SIZE,
            0,
            ctypes.byref(self._attributes),
        )
        if handle is None or handle == INVALID_HANDLE_VALUE:
            error = self._w.error("CreateNamedPipeW")
            if first and error.errno == ERROR_ACCESS_DENIED:
                raise FileExistsError(
                    ERROR_ACCESS_DENIED,
                    f"{self.path}: another process (a running daemon?) already serves this pipe",
                )
            raise error
        return handle

    def accept(self) -> PipeConnection:
        k = self._w.k
        with self._lock:
            if self._closed:
                raise OSError(ERROR_OPERATION_ABORTED, "pipe server closed")
            handle = self._next
        overlapped = _OVERLAPPED()
        overlapped.hEvent = self._event
        if not k.ConnectNamedPipe(handle, ctypes.byref(overlapped)):
            code = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
            if code == ERROR_IO_PENDING:
                count = ctypes.c_uint32()
                if not k.GetOverlappedResult(
                    handle, ctypes.byref(overlapped), ctypes.byref(count), True
                ):
                    raise self._w.error("ConnectNamedPipe")
            elif code != ERROR_PIPE_CONNECTED:  # a client came between create and connect
                raise OSError(code, f"ConnectNamedPipe failed (Win32 error {code})")
        with self._lock:
            if self._is_closed():  # closed while waiting
                k.CloseHandle(handle)
                raise OSError(ERROR_OPERATION_ABORTED, "pipe server closed")
            self._next = self._instance(first=False)  # the next client's instance, at once
        return _Win32Pipe(handle, server=True)

    def _is_closed(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        with self._lock:
            self._closed = True
            if self._next is not None:
                self._w.k.CancelIoEx(self._next, None)

    def close(self) -> None:
        self.cancel()
        with self._lock:
            handle, self._next = self._next, None
        if handle is not None:
            self._w.k.CloseHandle(handle)
            self._w.k.CloseHandle(self._event)
            self._w.k.LocalFree(self._descriptor)


def _win32_connect(path: str, timeout: float) -> PipeConnection:  # pragma: no cover - Windows
    w = _Win32.get()
    deadline = time.monotonic() + timeout
    while True:
        handle = w.k.CreateFileW(
            path,
            GENERIC_READ | GENERIC_WRITE,
            0,
            None,
            OPEN_EXISTING,
            FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
            None,
        )
        if handle is not None and handle != INVALID_HANDLE_VALUE:
            break
        error = w.error("CreateFileW")
        left = deadline - time.monotonic()
        if error.errno == ERROR_PIPE_BUSY and left > 0:
            w.k.WaitNamedPipeW(path, max(1, int(left * 1000)))
            continue
        if error.errno == ERROR_FILE_NOT_FOUND:
            raise FileNotFoundError(error.errno, f"{path}: no daemon serves this pipe")
        if error.errno == ERROR_ACCESS_DENIED:
            raise PermissionError(error.errno, f"{path}: access denied (another user's pipe?)")
        raise error
    try:
        _check_owner(w, handle, path)
    except BaseException:
        w.k.CloseHandle(handle)
        raise
    return _Win32Pipe(handle, server=False)


def _check_owner(w: _Win32, handle: Any, path: str) -> None:  # pragma: no cover - Windows only
    """Refuse a pipe whose owner is not this process's user (a squatter's)."""
    owner = ctypes.c_void_p()
    descriptor = ctypes.c_void_p()
    code = w.a.GetSecurityInfo(
        handle,
        SE_KERNEL_OBJECT,
        OWNER_SECURITY_INFORMATION,
        ctypes.byref(owner),
        None,
        None,
        None,
        ctypes.byref(descriptor),
    )
    if code != 0:
        raise OSError(code, f"{path}: cannot read the pipe's owner (Win32 error {code})")
    mine = ctypes.c_void_p()
    try:
        if not w.a.ConvertStringSidToSidW(w.user_sid(), ctypes.byref(mine)):
            raise w.error("ConvertStringSidToSidW")
        if not w.a.EqualSid(owner, mine):
            raise PermissionError(
                ERROR_ACCESS_DENIED, f"{path}: the pipe belongs to another user; not using it"
            )
    finally:
        w.k.LocalFree(descriptor)
        if mine.value:
            w.k.LocalFree(mine)
