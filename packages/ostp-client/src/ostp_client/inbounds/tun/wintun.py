"""Windows: a Wintun adapter (wintun.dll, loaded at run time with ctypes).

Wintun's API (wintun.h): `WintunCreateAdapter(name, tunnel_type, guid)` →
`WintunStartSession(adapter, ring_capacity)` → `WintunReceivePacket(session, &size)` /
`WintunReleaseReceivePacket`, `WintunAllocateSendPacket(session, size)` / `WintunSendPacket`,
`WintunGetReadWaitEvent(session)` (a Win32 event handle, waited on in a worker thread);
`WintunEndSession`, `WintunCloseAdapter`. Every call goes through the `dll` object, so the tests
drive this code with a fake DLL backed by real ctypes memory.

`WintunGetAdapterLUID` names the adapter for the IP Helper API: its MTU, metric, addresses and
the routes of ``auto_route`` are set by `ostp_client.inbounds.tun.windows_net.WindowsRouteManager`
(:meth:`WintunDevice.route_manager`). When the adapter is closed (or the process dies), Windows
removes it together with its addresses and routes.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ostp_client.errors import OstpClientError
from ostp_client.inbounds.tun.device import TunDevice

if TYPE_CHECKING:
    from ostp_client.inbounds.tun.windows_net import WindowsRouteManager

__all__ = ["WintunDevice", "WintunError", "load_wintun"]

logger = logging.getLogger(__name__)

RING_CAPACITY = 0x800000  # 8 MiB, within WINTUN_MIN/MAX_RING_CAPACITY
ERROR_NO_MORE_ITEMS = 259
ERROR_BUFFER_OVERFLOW = 111
WAIT_TIMEOUT_MS = 250
"""The worker thread wakes this often, so that cancellation is noticed."""


class WintunError(OstpClientError, OSError):
    """wintun.dll is missing or one of its calls failed."""


def load_wintun(path: str = "wintun.dll") -> Any:
    """Load wintun.dll and declare the signatures used here."""
    try:
        dll = ctypes.WinDLL(path)  # type: ignore[attr-defined,unused-ignore]
    except (OSError, AttributeError) as exc:
        raise WintunError(f"cannot load {path} (install Wintun from wintun.net): {exc}") from exc
    handle = ctypes.c_void_p
    dll.WintunCreateAdapter.restype = handle
    dll.WintunCreateAdapter.argtypes = [ctypes.c_wchar_p, ctypes.c_wchar_p, ctypes.c_void_p]
    dll.WintunCloseAdapter.argtypes = [handle]
    dll.WintunStartSession.restype = handle
    dll.WintunStartSession.argtypes = [handle, ctypes.c_uint32]
    dll.WintunEndSession.argtypes = [handle]
    dll.WintunGetReadWaitEvent.restype = handle
    dll.WintunGetReadWaitEvent.argtypes = [handle]
    dll.WintunReceivePacket.restype = ctypes.c_void_p
    dll.WintunReceivePacket.argtypes = [handle, ctypes.POINTER(ctypes.c_uint32)]
    dll.WintunReleaseReceivePacket.argtypes = [handle, ctypes.c_void_p]
    dll.WintunAllocateSendPacket.restype = ctypes.c_void_p
    dll.WintunAllocateSendPacket.argtypes = [handle, ctypes.c_uint32]
    dll.WintunSendPacket.argtypes = [handle, ctypes.c_void_p]
    dll.WintunGetAdapterLUID.restype = None
    dll.WintunGetAdapterLUID.argtypes = [handle, ctypes.POINTER(ctypes.c_uint64)]
    return dll


def _win32_wait(handle: Any, timeout_ms: int) -> None:  # pragma: no cover - Windows only
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    kernel32.WaitForSingleObject(handle, timeout_ms)


def _last_error() -> int:
    get = getattr(ctypes, "get_last_error", None)
    return int(get()) if get is not None else 0


class WintunDevice(TunDevice):
    """A started Wintun session on an adapter."""

    def __init__(
        self,
        dll: Any,
        name: str,
        *,
        wait: Callable[[Any, int], None] = _win32_wait,
        last_error: Callable[[], int] = _last_error,
    ) -> None:
        self._dll = dll
        self._wait = wait
        self._last_error = last_error
        self.name = name
        self.offload = False
        adapter = dll.WintunCreateAdapter(name, "OSTP", None)
        if not adapter:
            raise WintunError(f"WintunCreateAdapter({name!r}) failed (error {last_error()})")
        session = dll.WintunStartSession(adapter, RING_CAPACITY)
        if not session:
            dll.WintunCloseAdapter(adapter)
            raise WintunError(f"WintunStartSession failed (error {last_error()})")
        self._adapter = adapter
        self._session = session
        self._event = dll.WintunGetReadWaitEvent(session)
        self.write_drops = 0

    @classmethod
    def create(cls, name: str, *, mtu: int = 0) -> WintunDevice:  # pragma: no cover - Windows
        """Open the adapter (``mtu`` is set by the route manager's `configure`)."""
        return cls(load_wintun(), name)

    def luid(self) -> int:
        """The adapter's NET_LUID (what the IP Helper API identifies interfaces by)."""
        if not self._adapter:
            raise WintunError("the adapter is closed")
        value = ctypes.c_uint64()
        self._dll.WintunGetAdapterLUID(self._adapter, ctypes.byref(value))
        return int(value.value)

    def route_manager(self, api: Any = None, **kwargs: Any) -> WindowsRouteManager:
        """A `WindowsRouteManager` for this adapter, over ``api`` (default: iphlpapi.dll)."""
        from ostp_client.inbounds.tun.windows_net import (  # noqa: PLC0415
            IpHelper,
            WindowsRouteManager,
            load_iphlpapi,
        )

        if api is None:  # pragma: no cover - Windows only
            api = IpHelper(load_iphlpapi())
        return WindowsRouteManager(api, api.luid_to_index(self.luid()), **kwargs)

    def read_batch(self, limit: int = 256) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        if not self._session:
            return out
        size = ctypes.c_uint32()
        dll = self._dll
        for _ in range(limit):
            pointer = dll.WintunReceivePacket(self._session, ctypes.byref(size))
            if not pointer:
                error = self._last_error()
                if error not in (ERROR_NO_MORE_ITEMS, 0):
                    logger.debug("WintunReceivePacket: error %d", error)
                break
            try:
                out.append((ctypes.string_at(pointer, size.value), False))
            finally:
                dll.WintunReleaseReceivePacket(self._session, pointer)
        return out

    def write_batch(self, packets: Iterable[bytes]) -> None:
        if not self._session:
            return
        dll = self._dll
        for packet in packets:
            pointer = dll.WintunAllocateSendPacket(self._session, len(packet))
            if not pointer:
                self.write_drops += 1  # ring full (ERROR_BUFFER_OVERFLOW): like a full queue
                continue
            ctypes.memmove(pointer, packet, len(packet))
            dll.WintunSendPacket(self._session, pointer)

    async def wait_readable(self) -> None:
        await anyio.to_thread.run_sync(
            self._wait, self._event, WAIT_TIMEOUT_MS, abandon_on_cancel=True
        )

    def close(self) -> None:
        if self._session:
            self._dll.WintunEndSession(self._session)
            self._session = None
        if self._adapter:
            self._dll.WintunCloseAdapter(self._adapter)
            self._adapter = None
