"""The upstream-behaviour server as a process on a real UDP socket (for end-to-end tests)."""

from __future__ import annotations

import anyio
import pytest

from ostp_proto import Connect

from ..server.helpers import KEY, http_origin
from ..server.tunnel import StreamState, tunnel
from .process import upstream_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_the_shell_relays_an_origin_for_our_client() -> None:
    async with upstream_server(KEY) as address, http_origin() as port, tunnel(address, KEY) as t:
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
    async with upstream_server(KEY, "--ignore-connect") as address, tunnel(address, KEY) as t:
        await t.handshake()
        await t.wait(lambda: t.conn.ping_rtt is not None)  # the Ping right after the handshake
        st = t.streams[7] = StreamState()
        t.send(7, Connect("127.0.0.1:9"))
        await anyio.sleep(1.0)  # nothing to wait for: the answer must not come
        assert not st.ok and st.error is None
