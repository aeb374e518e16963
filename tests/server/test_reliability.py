"""The server keeps serving and always stops (reliability issue items 8 and 9).

* A session whose oldest datagram never gets through while everything after it does fills the
  in-flight span with the congestion window still open; that froze the server's timer loop
  for good, deaf to every other client and to SIGTERM.
* A core whose timer stays in the past must not stall anyone else.
* SIGINT/SIGTERM end ``ostp-server run`` while sessions are busy, and even when the event
  loop is stuck in a busy callback.
* A busy port is one line and exit status 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import anyio.abc
import pytest

from ostp_proto import ClientConnection, ConnectionConfig
from ostp_proto.arq import MAX_REORDER_BUFFER

from .helpers import KEY, poll_until, server, tcp_echo
from .process import RUN_SERVER, server_process, write_config
from .tunnel import Tunnel, tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

SERVER_SPAN = 8192  # the server's max_in_flight (ConnectionConfig default)


@asynccontextmanager
async def endless_origin() -> AsyncIterator[int]:
    """A TCP origin that sends to each connection until it goes away (a 4 GB download)."""

    async def stream_forever(stream: anyio.abc.SocketStream) -> None:
        block = os.urandom(65536)
        async with stream:
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                while True:
                    await stream.send(block)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, stream_forever)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


class VictimClient(ClientConnection):
    """Never takes the first full data datagram, nor any copy of it; takes all the rest.

    The server's oldest datagram then stays unacknowledged while everything after it is
    acknowledged, so its in-flight span fills up while its congestion window has room.
    """

    victim: bytes | None = None
    victim_drops = 0

    def receive_datagram(self, data: bytes, now: float) -> None:
        if len(data) >= 4000:
            if self.victim is None:
                self.victim = data
            if data == self.victim:
                self.victim_drops += 1
                return
        super().receive_datagram(data, now)


@asynccontextmanager
async def running(t: Tunnel) -> AsyncIterator[Tunnel]:
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(t.run)
            try:
                yield t
            finally:
                tg.cancel_scope.cancel()
    finally:
        t.sock.close()


async def test_full_in_flight_span_does_not_freeze_the_server(tmp_path: Path) -> None:
    config = write_config(tmp_path / "server.json", KEY)
    # never skip the hole; no flow control, which would hold the server to one stream window
    # (an upstream client, the case that froze the server, has none)
    patient = ConnectionConfig(gap_skip_after=600.0, extensions=False)
    async with endless_origin() as origin, server_process(config) as proc:
        addr = await proc.address()
        t = Tunnel(addr, KEY, config=patient)
        victim = t.conn = VictimClient(access_key=KEY, config=patient)
        async with running(t):
            await t.open(f"127.0.0.1:{origin}")
            # the server has sent SERVER_SPAN - 1 datagrams past the one that never arrives
            assert MAX_REORDER_BUFFER >= SERVER_SPAN - 1
            await t.wait(lambda: len(victim.receiver.buffer) >= SERVER_SPAN - 1, limit=120)
            assert victim.victim_drops >= 1
            # anyone else is still served: a fresh handshake and a Ping answered
            async with tunnel(addr, KEY) as fresh:
                await fresh.handshake()
                await fresh.wait(lambda: fresh.conn.ping_rtt is not None)
                assert await proc.stop(signal.SIGTERM) == 0
                await poll_until(lambda: fresh.terminated is not None)
                assert fresh.terminated == "closed by peer"
    assert "SIGTERM: shutting down" in proc.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_server_during_busy_sessions(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = write_config(tmp_path / "server.json", KEY)
    async with endless_origin() as origin, server_process(config) as proc:
        addr = await proc.address()
        async with tunnel(addr, KEY) as a, tunnel(addr, KEY) as b:
            streams = [(a, await a.open(f"127.0.0.1:{origin}")) for _ in range(2)]
            streams += [(b, await b.open(f"127.0.0.1:{origin}"))]
            for t, sid in streams:
                await t.read(sid, 2 << 20)
            assert await proc.stop(sig) == 0
            await poll_until(lambda: a.terminated is not None and b.terminated is not None)
            assert a.terminated == b.terminated == "closed by peer"
    assert f"{sig.name}: shutting down" in proc.log


FROZEN_LOOP = """
import logging, sys, anyio
from ostp_server import cli, server

async def frozen(self):
    await anyio.sleep(0.1)
    logging.getLogger("ostp_server").warning("test: the event loop freezes now")
    while True:
        pass

server.OstpServer._housekeeping_loop = frozen
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_ends_the_server_even_when_its_loop_is_stuck(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = write_config(tmp_path / "server.json", KEY)
    async with server_process(config, script=FROZEN_LOOP) as proc:
        await proc.wait_for("the event loop freezes now")
        assert await proc.stop(sig) == 1
        await proc.wait_for(f"{sig.name}: not stopped after")


async def test_timer_that_stays_in_the_past_does_not_stall_the_server() -> None:
    async with server() as srv, tcp_echo() as port, tunnel(srv.addresses[0], KEY) as t:
        sid = await t.open(f"127.0.0.1:{port}")
        (session,) = srv.sessions.values()
        session.conn.get_timer = lambda: 0.0  # type: ignore[method-assign]
        srv.flush(session)  # the server sees a deadline in the past that never moves
        await poll_until(lambda: srv.stats.timer_stuck > 0)
        async with tunnel(srv.addresses[0], KEY) as fresh:
            await fresh.handshake()
            await fresh.wait(lambda: fresh.conn.ping_rtt is not None)
        await t.write(sid, b"still served")
        assert await t.read(sid, 12) == b"still served"
        assert srv.stats.timer_stuck > 1  # it keeps being retried, a millisecond apart


@pytest.mark.timeout(60)
def test_busy_port_is_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "server.json", KEY, listen=f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-c", RUN_SERVER, "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"ostp-server: cannot listen on udp 127.0.0.1:{port}: Address already in use"
    ]
