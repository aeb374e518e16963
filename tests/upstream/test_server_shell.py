"""The upstream-behaviour server as a process on a real UDP socket (for end-to-end tests)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from ostp_proto import Connect

from ..server.helpers import KEY, http_origin
from ..server.tunnel import StreamState, tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def upstream_server(*options: str) -> AsyncIterator[tuple[str, int]]:
    """``python -m tests.upstream.server`` on a loopback port; its address."""
    command = [sys.executable, "-m", "tests.upstream.server", "--key", KEY, *options]
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


async def test_the_shell_relays_an_origin_for_our_client() -> None:
    async with upstream_server() as address, http_origin() as port, tunnel(address, KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        await t.write(sid, b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
        st = t.streams[sid]
        await t.wait(lambda: st.closed)  # the origin closes: upstream sends Close
        head, _, body = bytes(st.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == b"hello from the origin\n" * 1000
        refused = await t.open("127.0.0.1:1", expect_ok=False)
        assert (t.streams[refused].error or "").startswith("connect failed: ")


async def test_the_shell_can_answer_pings_but_never_connect() -> None:
    async with upstream_server("--ignore-connect") as address, tunnel(address, KEY) as t:
        await t.handshake()
        await t.wait(lambda: t.conn.ping_rtt is not None)  # the Ping right after the handshake
        st = t.streams[7] = StreamState()
        t.send(7, Connect("127.0.0.1:9"))
        await anyio.sleep(1.0)  # nothing to wait for: the answer must not come
        assert not st.ok and st.error is None
