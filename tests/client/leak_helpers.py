"""What a daemon process holds, read from /proc: descriptors and TCP sockets in CLOSE-WAIT.

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


def close_wait_sockets(pid: int | str = "self") -> list[str]:
    """The process's TCP sockets in CLOSE-WAIT, as "local -> remote" hex text from /proc."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_CLOSE_WAIT and fields[9] in inodes:
                found.append(f"{fields[1]} -> {fields[2]}")
    return found


async def settle(predicate: Callable[[], bool], time_limit: float = 20) -> bool:
    """Poll until ``predicate()`` holds; False (not an exception) when it never did, so that
    the caller can assert with a message that says what was left over."""
    with anyio.move_on_after(time_limit):
        while not predicate():  # noqa: ASYNC110 (counters, not events)
            await anyio.sleep(0.02)
        return True
    return predicate()
