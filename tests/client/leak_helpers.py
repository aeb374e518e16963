"""What a daemon process holds, read from /proc: descriptors, TCP sockets (CLOSE-WAIT), memory.

A connection whose peer closed but that the daemon never closed sits in CLOSE-WAIT and keeps
its descriptor: both counts must come back to where they were once the clients are gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio

TCP_CLOSE_WAIT = "08"  # include/net/tcp_states.h


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(pid: int | str) -> set[str]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN-SENT", "03": "SYN-RECV", "04": "FIN-WAIT-1",
    "05": "FIN-WAIT-2", "06": "TIME-WAIT", "07": "CLOSE", "08": "CLOSE-WAIT",
    "09": "LAST-ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def tcp_sockets(pid: int | str = "self") -> list[tuple[str, str, str]]:
    """The process's TCP sockets as (state, local, remote), addresses as hex text from /proc."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append((TCP_STATES.get(fields[3], fields[3]), fields[1], fields[2]))
    return found


def close_wait_sockets(pid: int | str = "self") -> list[str]:
    """The process's TCP sockets in CLOSE-WAIT, as "local -> remote" hex text from /proc."""
    return [
        f"{local} -> {remote}"
        for state, local, remote in tcp_sockets(pid)
        if state == TCP_STATES[TCP_CLOSE_WAIT]
    ]


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory of the process (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def settle(predicate: Callable[[], bool], time_limit: float = 20) -> bool:
    """Poll until ``predicate()`` holds; False (not an exception) when it never did, so that
    the caller can assert with a message that says what was left over."""
    with anyio.move_on_after(time_limit):
        while not predicate():  # noqa: ASYNC110 (counters, not events)
            await anyio.sleep(0.02)
        return True
    return predicate()
