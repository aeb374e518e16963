"""ostp_sockets: the UDP socket helpers the OSTP client and server share.

GSO/GRO batching (:class:`BatchSocket`), path-MTU socket options (:func:`set_dont_fragment`,
:func:`first_hop_payload`) and socket buffers (:func:`set_buffers`). Linux offers the batching
and the options; elsewhere every helper falls back to one datagram per system call. Standard
library only: both programs import it, and it imports neither.
"""

from .batch import MAX_GSO_BYTES, MAX_SEGMENTS, RECV_BUFFER, UDP_GRO, UDP_SEGMENT, BatchSocket
from .buffers import SocketBuffers, proc_udp_drops, set_buffers
from .path_mtu import (
    IPV4_UDP_OVERHEAD,
    IPV6_UDP_OVERHEAD,
    first_hop_payload,
    set_dont_fragment,
    udp_overhead,
)

__all__ = [
    "IPV4_UDP_OVERHEAD",
    "IPV6_UDP_OVERHEAD",
    "MAX_GSO_BYTES",
    "MAX_SEGMENTS",
    "RECV_BUFFER",
    "UDP_GRO",
    "UDP_SEGMENT",
    "BatchSocket",
    "SocketBuffers",
    "first_hop_payload",
    "proc_udp_drops",
    "set_buffers",
    "set_dont_fragment",
    "udp_overhead",
]

__version__ = "0.2.0.dev0"
"""The package version (read by the build: `[tool.hatch.version]`)."""
