"""Replayed first messages stay unanswered across restarts (reliability issue item 11).

An answer to a replayed first message tells an observer that an OSTP server listens there.
The replay cache is kept in a file (appended per handshake, rewritten atomically); without a
usable file the server refuses timestamps from before its start instead. Silence is proved by
a Pong on another, valid session that the server handles after the replay, not by waiting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_proto import ClientConnection
from ostp_server import OstpServer, load_config
from ostp_server.replay_cache import ENTRY, MAGIC, ReplayCacheFile
from ostp_server.server import RESTART_SKEW_ALLOWANCE

from .helpers import KEY, server
from .process import server_process, write_config
from .tunnel import tunnel

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def first_datagram(unix_offset: float = 0.0) -> bytes:
    c = ClientConnection(access_key=KEY)
    c.connect(time.monotonic(), time.time() + unix_offset)
    (d,) = c.datagrams_to_send(time.monotonic())
    return d


async def answered(addr: tuple[str, int], datagram: bytes) -> bool:
    """Send ``datagram`` from a fresh socket; True if the server answered it.

    A witness session then handshakes and gets a Pong: the server has handled the datagram
    by then, and any answer to it has already arrived.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        probe.setblocking(False)
        probe.sendto(datagram, addr)
        async with tunnel(addr, KEY) as witness:
            await witness.handshake()
            await witness.wait(lambda: witness.conn.ping_rtt is not None)
        try:
            probe.recv(65535)
        except BlockingIOError:
            return False
        return True


async def test_replay_after_a_restart_gets_no_answer(tmp_path: Path) -> None:
    cache = str(tmp_path / "replay-cache")
    async with server(replay_cache=cache) as first, tunnel(first.addresses[0], KEY) as t:
        await t.handshake()
        captured = t.first_datagrams[0]
        assert not await answered(first.addresses[0], captured)  # the live cache
    async with server(replay_cache=cache) as second:
        assert not await answered(second.addresses[0], captured)
        assert second.acceptor.stats.replay_drop == 1
        assert second.acceptor.stats.restart_drop == 0
        # a message stamped well before the start is answered: the cache made the fallback
        # rule unnecessary, so clients with slow clocks are not refused
        assert await answered(second.addresses[0], first_datagram(-4 * RESTART_SKEW_ALLOWANCE))


async def test_replay_after_a_crash_gets_no_answer(tmp_path: Path) -> None:
    """SIGKILL: nothing is rewritten at shutdown; the appended entry is what remains."""
    config = write_config(tmp_path / "server.json", KEY)
    async with server_process(config) as proc:
        addr = await proc.address()
        async with tunnel(addr, KEY) as t:
            await t.handshake()
            captured = t.first_datagrams[0]
        proc.process.kill()
        await proc.process.wait()
    assert (tmp_path / "server.replay-cache").stat().st_size == len(MAGIC) + ENTRY.size
    async with server_process(config) as proc:
        assert not await answered(await proc.address(), captured)


async def test_without_a_cache_timestamps_before_the_start_are_refused(tmp_path: Path) -> None:
    stale = first_datagram(-2 * RESTART_SKEW_ALLOWANCE)  # captured before the restart
    async with server() as srv:  # no cache file at all
        assert not await answered(srv.addresses[0], stale)
        assert srv.acceptor.stats.restart_drop == 1
        # within the allowance, clocks that are a little behind still get in
        assert await answered(srv.addresses[0], first_datagram(-RESTART_SKEW_ALLOWANCE / 2))


async def test_unusable_cache_file_falls_back_and_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "replay-cache"
    cache.write_bytes(b"something else entirely\n")
    async with server(replay_cache=str(cache)) as srv:
        assert not await answered(srv.addresses[0], first_datagram(-2 * RESTART_SKEW_ALLOWANCE))
        assert srv.acceptor.stats.restart_drop == 1
    assert cache.read_bytes().startswith(MAGIC)


async def test_unwritable_cache_location_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    caplog.set_level(logging.WARNING, "ostp_server")
    async with server(replay_cache=str(blocker / "replay-cache")) as srv:
        assert not await answered(srv.addresses[0], first_datagram(-2 * RESTART_SKEW_ALLOWANCE))
        assert srv.acceptor.stats.restart_drop == 1
    warnings = [r.getMessage() for r in caplog.records if "replay cache" in r.getMessage()]
    # one "cannot read" and one "cannot write", not one per handshake or rewrite
    assert sorted(w.split(" the ")[0] for w in warnings) == ["cannot read", "cannot write"]


async def test_cache_is_rewritten_without_expired_entries(tmp_path: Path) -> None:
    cache = tmp_path / "replay-cache"
    now = int(time.time())
    expired = [(now - 1000, 1), (now + 1000, 2)]
    live = [(now - 10, 3), (now, 4)]
    cache.write_bytes(MAGIC + b"".join(ENTRY.pack(*e) for e in expired + live))
    srv = OstpServer(load_config(_config_file(tmp_path, replay_cache=str(cache))))
    async with anyio.create_task_group() as tg:
        await tg.start(srv.run)
        assert ReplayCacheFile(cache).load() == live
        tg.cancel_scope.cancel()


def _config_file(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"listen": "127.0.0.1:0", "access_keys": [KEY], **extra}))
    return path


def test_cache_path_defaults_beside_the_config(tmp_path: Path) -> None:
    assert load_config(_config_file(tmp_path)).replay_cache == str(tmp_path / "server.replay-cache")
    relative = load_config(_config_file(tmp_path, replay_cache="state/cache"))
    assert relative.replay_cache == str(tmp_path / "state" / "cache")
    absolute = str(tmp_path / "elsewhere")
    assert load_config(_config_file(tmp_path, replay_cache=absolute)).replay_cache == absolute


entries = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)), max_size=40)


@settings(max_examples=50, deadline=None)
@given(before=entries, after=entries, cut=st.integers(0, ENTRY.size - 1))
def test_cache_file_round_trip_and_torn_tail(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[tuple[int, int]],
    after: list[tuple[int, int]],
    cut: int,
) -> None:
    path = tmp_path_factory.mktemp("cache") / "replay-cache"
    store = ReplayCacheFile(path)
    assert store.load() is None
    store.rewrite(before)
    for e in after:
        store.append(*e)
    store.close()
    assert store.load() == before + after
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    if after and cut:  # a crash in the middle of the last append
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size - ENTRY.size + cut)
        assert store.load() == before + after[:-1]
    os.unlink(path)
