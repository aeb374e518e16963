"""``python -m tests.upstream.server`` as a child process (for end-to-end tests)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def upstream_server(key: str, *options: str) -> AsyncIterator[tuple[str, int]]:
    """The upstream-behaviour server on a loopback port, serving ``key``; its address."""
    command = [sys.executable, "-m", "tests.upstream.server", "--key", key, *options]
    process = await anyio.open_process(command, cwd=REPO, stderr=None)
    try:
        assert process.stdout is not None
        with anyio.fail_after(20):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 200)
        host, _, port = line.decode().removeprefix("listening on ").rpartition(":")
        yield host, int(port)
    finally:
        process.terminate()
        with anyio.move_on_after(10, shield=True):
            await process.wait()
        await process.aclose()
