"""What the TUN inbound needs from a device, whichever the operating system."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import anyio

__all__ = ["TunDevice"]


class TunDevice(ABC):
    """An open TUN interface: whole IP packets in and out, no link-layer header."""

    name: str = ""
    offload: bool = False
    """Packets written may leave the TCP/UDP checksum to the kernel (virtio-net header)."""
    fd: int = -1

    @abstractmethod
    def read_batch(self, limit: int = 256) -> list[tuple[bytes, bool]]:
        """Packets waiting now (at most ``limit``), each with "checksum already verified"."""

    @abstractmethod
    def write_batch(self, packets: Iterable[bytes]) -> None:
        """Write packets to the system; a full queue drops them (TCP retransmits)."""

    @abstractmethod
    def close(self) -> None:
        """Close the device (idempotent)."""

    async def wait_readable(self) -> None:
        """Return when :meth:`read_batch` may find a packet."""
        await anyio.wait_readable(self.fd)
