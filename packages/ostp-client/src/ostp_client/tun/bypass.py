"""Keep the daemon's own sockets out of the TUN: the process-wide routing mark (Linux).

With ``auto_route`` the TUN inbound sends every packet that does *not* carry the routing mark
to its own routing table, whose default routes lead into the device (policy routing, as
wg-quick and sing-box do it; see `ostp_client.tun.linux.PolicyRouting`). A socket the daemon
opens towards the outside world (the `direct` outbound, the ostp sessions' UDP sockets, DNS
forwarded to `direct`) is given that mark with ``SO_MARK`` before it connects or sends, so the
kernel looks it up in the main table and it never loops back into the tunnel.

The mark is process-wide state on purpose: the TUN inbound sets it when it installs its rules
and clears it when it removes them, and every outbound calls :func:`apply_bypass` on the
sockets it creates, without the mark being threaded through every constructor.
"""

from __future__ import annotations

import logging
import socket
import sys

__all__ = [
    "BypassError",
    "apply_bypass",
    "clear_routing_mark",
    "routing_mark",
    "set_routing_mark",
    "so_mark_supported",
]

logger = logging.getLogger(__name__)

SO_MARK = getattr(socket, "SO_MARK", 36)  # linux/asm-generic/socket.h

_mark: int | None = None


class BypassError(OSError):
    """A socket could not be given the routing mark (it would loop into the TUN)."""


def set_routing_mark(mark: int) -> None:
    """Make :func:`apply_bypass` mark sockets with ``mark`` from now on (the TUN inbound)."""
    global _mark
    if not 0 < mark <= 0xFFFFFFFF:
        raise ValueError(f"routing mark {mark:#x} out of range 1..0xffffffff")
    _mark = mark


def clear_routing_mark(mark: int | None = None) -> None:
    """Stop marking (only if ``mark`` is the one set, when given)."""
    global _mark
    if mark is None or _mark == mark:
        _mark = None


def routing_mark() -> int | None:
    """The process-wide mark, None when no TUN (or other owner) asked for one."""
    return _mark


def so_mark_supported() -> bool:
    """This system has ``SO_MARK`` (Linux only)."""
    return sys.platform == "linux"


def apply_bypass(sock: socket.socket, mark: int | None = None) -> bool:
    """Give ``sock`` the routing mark (``mark``, else the process-wide one) before it is used.

    Returns True when a mark was set, False when there is none to set (no TUN with
    ``auto_route`` runs, or not Linux). Raises :class:`BypassError` when a mark is wanted but
    the kernel refuses it (``SO_MARK`` needs CAP_NET_ADMIN): such a socket would be routed into
    the tunnel, so it must not be used.
    """
    if mark is None:
        mark = _mark
    if mark is None or not so_mark_supported():
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise BypassError(
            exc.errno,
            f"cannot set SO_MARK {mark:#x} on an outgoing socket ({exc.strerror}); "
            "it needs CAP_NET_ADMIN",
        ) from None
    return True
