"""Which local program owns a connection (for `process_name` / `process_path` rules).

Linux only. The connection's local end (the source address the proxy or the TUN saw) is looked
up with a sock_diag netlink dump (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` with an
`inet_diag_req_v2` whose `idiag_sport` the kernel filters on; linux/inet_diag.h), which gives
the socket's inode and owner uid. The process is the one with that inode among its open file
descriptors (`/proc/PID/fd/* -> socket:[INODE]`), searched among the processes of that uid,
the recent owners first; its name is `/proc/PID/comm` and its path the target of
`/proc/PID/exe`. A lookup costs one netlink round trip and, at worst, one readlink per open
descriptor of that user's processes, so it runs only when a rule with a process condition is
reached.

Other platforms: `ProcessLookupUnsupported` (the config check refuses process rules there).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ostp_client.errors import OstpClientError

__all__ = [
    "ProcessInfo",
    "ProcessLookupUnsupported",
    "ProcessResolver",
    "find_socket_inode",
]

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_SOCKID_PORTS = struct.Struct(">HH")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode
_MSG = struct.Struct("=BBBB48sIIIII")


class ProcessLookupUnsupported(OstpClientError, OSError):
    """This platform has no way (here) to find the owner of a socket."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    name: str
    """`/proc/PID/comm` (at most 15 characters on Linux)."""
    path: str
    """The executable (`/proc/PID/exe`); empty when it cannot be read (another user's)."""


def _request(family: int, protocol: int, sport: int, seq: int) -> bytes:
    body = struct.pack(
        "=BBBBI",
        family,
        protocol,
        0,
        0,
        ALL_STATES,
    )
    sockid = (
        _SOCKID_PORTS.pack(sport, 0)
        + bytes(32)
        + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    payload = body + sockid
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(payload), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + payload


def find_socket_inode(local: tuple[str, int], protocol: str = "tcp") -> tuple[int, int] | None:
    """(inode, uid) of the socket whose local end is `local` (IP text, port); None if none."""
    if not sys.platform.startswith("linux"):
        raise ProcessLookupUnsupported("socket owners can be looked up on Linux only")
    ip = ipaddress.ip_address(local[0])
    proto = socket.IPPROTO_TCP if protocol == "tcp" else socket.IPPROTO_UDP
    wanted: list[tuple[int, bytes]] = []
    if ip.version == 4:
        wanted.append((socket.AF_INET, ip.packed + bytes(12)))
        # a dual-stack socket shows its IPv4 peer as ::ffff:a.b.c.d
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        wanted.append((socket.AF_INET6, mapped.packed))
    else:
        wanted.append((socket.AF_INET6, ip.packed))
    for family, address in wanted:
        found = _dump(family, proto, local[1], address)
        if found is not None:
            return found
    return None


_seq_lock = threading.Lock()
_seq = 0


def _next_seq() -> int:
    global _seq
    with _seq_lock:
        _seq = (_seq + 1) & 0xFFFFFFFF
        return _seq


def _dump(family: int, protocol: int, sport: int, address: bytes) -> tuple[int, int] | None:
    netlink = getattr(socket, "AF_NETLINK", None)
    if netlink is None:
        raise ProcessLookupUnsupported("no netlink sockets here")
    seq = _next_seq()
    with socket.socket(netlink, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.sendto(_request(family, protocol, sport, seq), (0, 0))
        result: tuple[int, int] | None = None
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return result
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return result
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                    if code:
                        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
                    return result
                if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
                    continue
                _fam, _state, _t, _r, sockid, _exp, _rq, _wq, uid, inode = _MSG.unpack_from(body)
                port = _SOCKID_PORTS.unpack_from(sockid)[0]
                src = sockid[4:20]
                if port == sport and src == address and inode and result is None:
                    result = (inode, uid)


class ProcessResolver:
    """Socket inode → process, remembering the recent owners (most programs open many)."""

    RECENT = 32

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.lookups = 0
        self.misses = 0

    def __call__(self, local: tuple[str, int], network: str = "tcp") -> ProcessInfo | None:
        """The program whose socket has the local end `local`; None when not found."""
        self.lookups += 1
        found = find_socket_inode(local, network)
        if found is None:
            self.misses += 1
            return None
        inode, uid = found
        pid = self._owner(inode, uid)
        if pid is None:
            self.misses += 1
            return None
        return self.describe(pid)

    def describe(self, pid: int) -> ProcessInfo | None:
        base = f"{self.proc}/{pid}"
        try:
            with open(f"{base}/comm", encoding="utf-8", errors="replace") as handle:
                name = handle.read().rstrip("\n")
        except OSError:
            return None
        try:
            path = os.readlink(f"{base}/exe")
        except OSError:
            path = ""
        return ProcessInfo(pid, name, path.removesuffix(" (deleted)"))

    def _owner(self, inode: int, uid: int) -> int | None:
        target = f"socket:[{inode}]"
        with self._lock:
            recent = list(reversed(self._recent))
        tried = set()
        for pid in recent:
            tried.add(pid)
            if self._has(pid, target):
                self._remember(pid)
                return pid
        try:
            entries = os.listdir(self.proc)
        except OSError:
            return None
        for entry in entries:
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in tried:
                continue
            try:
                if os.stat(f"{self.proc}/{entry}").st_uid != uid:
                    continue
            except OSError:
                continue
            if self._has(pid, target):
                self._remember(pid)
                return pid
        return None

    def _has(self, pid: int, target: str) -> bool:
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
            except OSError:
                continue
        return False

    def _remember(self, pid: int) -> None:
        with self._lock:
            self._recent.pop(pid, None)
            self._recent[pid] = None
            while len(self._recent) > self.RECENT:
                self._recent.popitem(last=False)
