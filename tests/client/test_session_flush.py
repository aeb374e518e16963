"""Who flushes a session: writers hand the core their data and schedule one flush per pass.

A stream that writes (``send_data``, ``send_message``, ``consumed``) gives the session's core
its data and asks for a flush in the event loop's next pass (a loop callback, scheduled once
however many streams write in the pass); the session's own turn flushes too. What must hold:
many writers of one pass share one ``send_batch``; the scheduled flush still shortens the
session's sleep when the data in flight makes the core's timer earlier; a flush that fires
after the connection ended or was replaced does nothing harmful; a failure inside it ends the
session the way a failure of the session's own loop does (its streams reset, a new session
starts), never silently and never leaving a stream waiting.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from ostp_client.flow import ConnContext
from ostp_client.outbounds.ostp import OstpOutbound, OstpStream, _Session
from ostp_client.transport.udp import UdpTransport, open_udp_socket
from ostp_proto import Data, RelayMessageReceived
from ostp_sockets import BatchSocket
from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
    wait_for,
)
from tests.client.test_tunnel import tunnel_config
from tests.client.tunnel_helpers import ostp_server
from tests.proto.harness import KEY, Pair

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


class _CountingUdp(UdpTransport):
    """A real UDP transport that also records each ``send_batch`` call's datagrams."""

    def __init__(self, batch: BatchSocket, sink: socket.socket) -> None:
        super().__init__(batch, None)
        self.calls: list[list[bytes]] = []
        self.sink = sink

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        self.calls.append(list(datagrams))
        return super().send_batch(datagrams)

    def received(self) -> list[bytes]:
        """What the sink socket got (the datagrams really went out)."""
        out = []
        while True:
            try:
                out.append(self.sink.recv(1 << 17))
            except BlockingIOError:
                return out


def _established_pair() -> Pair:
    """A client core and a server core, handshaken on the real clock (the session reads
    ``time.monotonic()``, so the cores' timers must be on it too)."""
    pair = Pair(start=time.monotonic())
    pair.handshake(limit=pair.now + 10)
    client = pair.client

    def settled() -> bool:  # all acknowledged, nothing left to send: a keepalive ahead
        timer = client.get_timer()
        return not client.sender.outstanding and timer is not None and timer > pair.now

    pair.run_until(settled, pair.now + 10)
    assert settled()
    # The virtual clock ran a few link latencies ahead: wait for the real one to pass it, so
    # that what the core paces out is due when the session flushes.
    while time.monotonic() <= pair.now:
        time.sleep(0.001)
    return pair


@pytest.fixture
def wired() -> Iterator[tuple[_Session, Pair, _CountingUdp]]:
    """A session (not supervised: no driving task) on an established core, its datagrams
    sent over a real UDP socket to a local sink."""
    outbound = OstpOutbound("proxy", server=("127.0.0.1", 9), access_key=KEY)
    session = outbound.sessions[0]
    pair = _established_pair()
    session.conn = pair.client
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    sock, _ = open_udp_socket(socket.AF_INET, 1 << 20)
    sock.connect(sink.getsockname())
    transport = _CountingUdp(BatchSocket(sock, gso=False, gro=False), sink)
    session.transport = transport
    yield session, pair, transport
    transport.close()
    sink.close()


def _bind_streams(session: _Session, ids: range) -> None:
    for stream_id in ids:
        session.bind(stream_id, OstpStream(session, stream_id, ConnContext(stream_id, "in")))


def _due(session: _Session) -> bool:
    """A flush is scheduled and has not run (a function: no narrowing between reads)."""
    return session._flush_due


async def _passes(n: int = 3) -> None:
    """Let the event loop run ``n`` passes (the scheduled flush runs in the next one)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_writers_of_one_pass_share_one_flush(
    wired: tuple[_Session, Pair, _CountingUdp],
) -> None:
    session, pair, transport = wired
    session._call_soon = asyncio.get_running_loop().call_soon  # as supervise() does
    ids = range(1, 17)
    _bind_streams(session, ids)
    go = anyio.Event()
    waiting = written = 0

    async def write(stream_id: int) -> None:
        nonlocal waiting, written
        waiting += 1
        await go.wait()
        await session.send_data(stream_id, bytes([stream_id]) * 100)
        written += 1

    async with anyio.create_task_group() as tg:
        for stream_id in ids:
            tg.start_soon(write, stream_id)
        await wait_for(lambda: waiting == len(ids))
        transport.calls.clear()
        go.set()  # every writer runs in the same pass
        await wait_for(lambda: written == len(ids))
    await wait_for(lambda: bool(transport.calls))
    await _passes()
    assert len(transport.calls) == 1, [len(c) for c in transport.calls]  # not one per writer
    assert not _due(session)
    # ... and that one call carried every writer's data: the server core gets all of it
    got: dict[int, bytes] = {}
    server = pair.server
    assert server is not None
    for datagram in transport.received():
        server.receive_datagram(datagram, pair.now)
    while (event := server.next_event()) is not None:
        if isinstance(event, RelayMessageReceived) and isinstance(event.message, Data):
            got[event.stream_id] = got.get(event.stream_id, b"") + event.message.data
    assert got == {stream_id: bytes([stream_id]) * 100 for stream_id in ids}


class _RecordingWaiters(dict[int, anyio.Event]):
    """The session's send waiters, recording for each writer that had to wait whether a
    flush was still due at that moment."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session
        self.waited_with_flush_due: list[bool] = []

    def __setitem__(self, stream_id: int, event: anyio.Event) -> None:
        self.waited_with_flush_due.append(self.session._flush_due)
        super().__setitem__(stream_id, event)


async def test_a_writer_that_finds_the_core_full_flushes_what_is_due_before_waiting(
    wired: tuple[_Session, Pair, _CountingUdp],
) -> None:
    """Writers of one pass fill the core (its send buffer counts what is not flushed yet):
    the first that finds no room sends what this pass gave the core (one flush for all of
    them still) and waits only if the core stays full, never for a flush already due."""
    session, _, transport = wired
    session._call_soon = asyncio.get_running_loop().call_soon
    waiters = _RecordingWaiters(session)
    session._send_waiters = waiters
    writers = 24  # 24 x 64 KiB: past the core's send buffer (1 MiB) within one pass
    ids = range(1, writers + 1)
    _bind_streams(session, ids)
    go = anyio.Event()
    waiting = written = 0

    async def write(stream_id: int) -> None:
        nonlocal waiting, written
        waiting += 1
        await go.wait()
        await session.send_data(stream_id, bytes([stream_id]) * 64 * 1024)
        written += 1

    async with anyio.create_task_group() as tg:
        for stream_id in ids:
            tg.start_soon(write, stream_id)
        await wait_for(lambda: waiting == writers)
        transport.calls.clear()
        go.set()
        # the rest wait for acknowledgements (no driving task here): every writer has
        # either written or is waiting
        await wait_for(lambda: written + len(waiters) == writers)
        tg.cancel_scope.cancel()
    assert written < writers  # the core did fill up
    assert waiters.waited_with_flush_due  # some waited ...
    assert not any(waiters.waited_with_flush_due)  # ... but none for a flush already due
    assert transport.calls  # what was due went out


async def test_the_scheduled_flush_shortens_the_sessions_sleep(
    wired: tuple[_Session, Pair, _CountingUdp],
) -> None:
    session, _, transport = wired
    conn = session.conn
    assert conn is not None
    session._call_soon = asyncio.get_running_loop().call_soon
    _bind_streams(session, range(1, 2))
    timer = conn.get_timer()
    assert timer is not None
    # the driving task sleeps until the core's deadline as it stands (a keepalive, far off)
    with anyio.CancelScope() as sleep:
        session._sleep, session._sleep_until = sleep, timer
        await session.send_data(1, b"x" * 1000)
        assert not sleep.cancel_called  # the writer only scheduled the flush
        await wait_for(lambda: bool(transport.calls))
        # the data in flight armed the retransmission timer, earlier than the sleep's end
        later = conn.get_timer()
        assert later is not None and later < timer
        assert sleep.cancel_called
    session._sleep = None


async def test_a_scheduled_flush_after_teardown_or_replacement_is_harmless(
    wired: tuple[_Session, Pair, _CountingUdp],
) -> None:
    session, _, transport = wired
    session._call_soon = asyncio.get_running_loop().call_soon
    _bind_streams(session, range(1, 3))
    stream = session.channels[1]
    assert isinstance(stream, OstpStream)
    await session.send_data(1, b"x" * 100)  # schedules a flush ...
    assert _due(session)
    session._teardown("test")  # ... then the connection ends before it runs
    assert session.conn is None and session.transport is None
    sent = len(transport.calls)
    await _passes()
    assert len(transport.calls) == sent  # the ended connection sends nothing more
    assert session._flush_error is None and not _due(session)
    with pytest.raises(anyio.BrokenResourceError):
        await stream.receive()  # the stream was reset by the teardown, not left waiting

    # A flush scheduled for one connection that fires once another replaced it flushes the
    # new one (its own data, nothing of the old connection's).
    old = _established_pair()
    new = _established_pair()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    sock, _ = open_udp_socket(socket.AF_INET, 1 << 20)
    sock.connect(sink.getsockname())
    second = _CountingUdp(BatchSocket(sock, gso=False, gro=False), sink)
    try:
        session.conn, session.transport = old.client, second
        _bind_streams(session, range(1, 2))
        await session.send_data(1, b"old" * 100)
        session.conn = new.client  # replaced before the scheduled flush runs
        await _passes()
        assert session._flush_error is None and not _due(session)
        assert old.client.stream_send_buffered(1) > 0  # the old core's data stayed there
    finally:
        session.conn = session.transport = None
        second.close()
        sink.close()


async def test_without_asyncio_call_soon_writers_flush_at_once(
    wired: tuple[_Session, Pair, _CountingUdp],
) -> None:
    """Another event loop than asyncio's (trio under anyio): no callback, the inline flush."""
    session, _, transport = wired
    session._call_soon = None
    _bind_streams(session, range(1, 2))
    await session.send_data(1, b"x" * 100)
    assert len(transport.calls) == 1  # before any other task ran
    assert not _due(session)


# --------------------------------------------------------------------------------------------
# a failure inside the scheduled flush, end to end


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _break_one_flush(
    monkeypatch: pytest.MonkeyPatch, error: Exception, when: Callable[[_Session], bool]
) -> list[int]:
    """Make the first `_Session.flush` for which ``when`` holds raise ``error``; the list
    counts the failures."""
    real = _Session.flush
    failures: list[int] = []

    def failing_once(self: _Session) -> None:
        if not failures and when(self):
            failures.append(1)
            raise error
        real(self)

    monkeypatch.setattr(_Session, "flush", failing_once)
    return failures


@asynccontextmanager
async def _failed_fetch(
    origin: Origin, tmp_path: Path, failures: list[int]
) -> AsyncIterator[tuple[OstpOutbound, _Session, list[str]]]:
    """A connected daemon whose first fetch meets the broken flush and fails (not a short
    success); then the session is re-established. Yields the outbound, its session and curl's
    proxy arguments, once the session is connected again."""
    with ostp_server(tmp_path) as server:
        config = tunnel_config(server.outbound(reconnect_delay=0.2))
        async with running_daemon(config) as daemon:
            outbound = daemon.outbounds["proxy"]
            assert isinstance(outbound, OstpOutbound)
            session = outbound.sessions[0]
            await wait_for(lambda: outbound.state == "connected", 15)
            args = [*proxy_args("socks5h", proxy_port(daemon)), "-o", "/dev/null"]
            result = await curl([*args, origin.url("/bytes/100000")], time_limit=30)
            assert failures == [1]
            assert result.returncode != 0, result.stdout
            await wait_for(lambda: session.reconnects >= 1, 15)
            await wait_for(lambda: outbound.state == "connected", 15)
            yield outbound, session, args


async def test_a_failing_scheduled_flush_ends_the_session_and_resets_its_streams(
    origin: Origin,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a loop callback runs outside any task: that is the scheduled flush
    failures = _break_one_flush(
        monkeypatch,
        RuntimeError("injected failure in the scheduled flush"),
        lambda session: bool(session.channels) and asyncio.current_task() is None,
    )
    # the stream's Connect is in the flush that fails: the session ends, the stream is reset
    # (curl fails, it does not wait), and a new session starts
    async with _failed_fetch(origin, tmp_path, failures) as (_outbound, _session, args):
        # the session's own failure path reported it (not the loop's exception handler)
        failed = [r for r in caplog.records if r.getMessage() == "proxy session 0 failed"]
        assert failed and failed[0].exc_info is not None
        assert "injected failure" in repr(failed[0].exc_info[1])
        fine = await curl([*args, "-w", "%{size_download}", origin.url("/bytes/100000")])
        assert (fine.returncode, fine.stdout) == (0, "100000"), fine.stderr


async def test_a_socket_error_inside_the_attempt_is_reported_as_one(
    origin: Origin,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An OSError raised while the session drives its connection (here by a send) reaches
    `_supervise` inside the attempt's task group, which anyio wraps in an ExceptionGroup: it
    is still a socket error (a warning), not an internal error with a traceback."""
    failures = _break_one_flush(
        monkeypatch,
        OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)),
        lambda session: bool(session.channels),
    )
    async with _failed_fetch(origin, tmp_path, failures):
        unreachable = os.strerror(errno.ENETUNREACH)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert f"proxy session 0: socket error: {unreachable}" in warned
        assert not [r for r in caplog.records if r.getMessage() == "proxy session 0 failed"]
