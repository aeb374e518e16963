r"""The control socket's named-pipe transport, on Linux against in-memory pipes.

`control.pipes.create_pipe_server` / `connect_pipe` are replaced by a fake pipe namespace whose
connections are pairs of in-memory byte channels with the same blocking semantics as the Win32
ones (reads wait; `cancel()` wakes them; a closed end reads as EOF and breaks the peer's
writes). Everything above runs for real: the daemon's `ControlServer` with `PipeListener` and
`PipeByteStream`, and `ControlClient` with its thread-backed `PipeTransport`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from ostp_client.control import pipes
from ostp_client.control.client import (
    ControlClient,
    ControlConnectionError,
    ControlError,
    open_pipe_streams,
)
from ostp_client.control.listeners import PipeByteStream, PipeListener, open_pipe_listener
from ostp_client.control.protocol import (
    MAX_LINE,
    TOPICS,
    DaemonStatus,
    LogBatch,
    Response,
    parse_server_message,
)
from ostp_client.control.server import ControlServer
from ostp_client.inbounds.base import StartError
from tests.client.test_control import _outbounds
from tests.tui.live import base_config, control_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

PIPE = r"\\.\pipe\ostp-client-test"


class _Channel:
    """One direction of a pipe: bytes written by one end, read by the other."""

    def __init__(self, lock: threading.Condition) -> None:
        self.data = bytearray()
        self.ended = False
        self.lock = lock


class FakePipeEnd:
    """A `pipes.PipeConnection` over two in-memory channels."""

    def __init__(self, incoming: _Channel, outgoing: _Channel, lock: threading.Condition) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        self.lock = lock
        self.cancelled = False
        self.closed = False
        self.written = bytearray()

    def read(self, max_bytes: int) -> bytes:
        with self.lock:
            self.lock.wait_for(lambda: self.incoming.data or self.incoming.ended or self.cancelled)
            if self.cancelled or not self.incoming.data:
                return b""
            out = bytes(self.incoming.data[:max_bytes])
            del self.incoming.data[:max_bytes]
            return out

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.cancelled or self.outgoing.ended:
                raise BrokenPipeError(109, "The pipe has been ended")
            self.outgoing.data += data
            self.written += data
            self.lock.notify_all()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            self.incoming.ended = self.outgoing.ended = True  # the peer sees the end
            self.lock.notify_all()

    def close(self) -> None:
        self.cancel()
        self.closed = True


def pipe_pair() -> tuple[FakePipeEnd, FakePipeEnd]:
    lock = threading.Condition()
    up, down = _Channel(lock), _Channel(lock)
    return FakePipeEnd(down, up, lock), FakePipeEnd(up, down, lock)


class FakePipeServer:
    def __init__(self, namespace: FakePipes, path: str) -> None:
        self.namespace = namespace
        self.path = path
        self.lock = threading.Condition()
        self.pending: list[FakePipeEnd] = []
        self.accepted: list[FakePipeEnd] = []
        self.accept_calls = 0
        self.cancelled = False
        self.closed = False

    def accept(self) -> pipes.PipeConnection:
        with self.lock:
            self.accept_calls += 1
            self.lock.wait_for(lambda: self.pending or self.cancelled)
            if self.cancelled:
                raise OSError(995, "The I/O operation has been aborted")
            end = self.pending.pop(0)
            self.accepted.append(end)
            return end

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            self.lock.notify_all()

    def close(self) -> None:
        self.cancel()
        self.closed = True
        self.namespace.servers.pop(self.path, None)


class FakePipes:
    """The pipe namespace: what `create_pipe_server` and `connect_pipe` see."""

    def __init__(self) -> None:
        self.servers: dict[str, FakePipeServer] = {}
        self.foreign: set[str] = set()
        """Names served by another user's process (a squatter)."""
        self.clients: list[FakePipeEnd] = []

    def create_pipe_server(self, path: str) -> pipes.PipeServer:
        if path in self.servers or path in self.foreign:
            raise FileExistsError(5, f"{path}: another process already serves this pipe")
        server = self.servers[path] = FakePipeServer(self, path)
        return server

    def connect_pipe(self, path: str, timeout: float = 5.0) -> pipes.PipeConnection:
        if path in self.foreign:
            raise PermissionError(5, f"{path}: the pipe belongs to another user; not using it")
        server = self.servers.get(path)
        if server is None:
            raise FileNotFoundError(2, f"{path}: no daemon serves this pipe")
        client, served = pipe_pair()
        with server.lock:
            server.pending.append(served)
            server.lock.notify_all()
        self.clients.append(client)
        return client


@pytest.fixture
def fake_pipes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePipes]:
    namespace = FakePipes()
    monkeypatch.setattr(pipes, "create_pipe_server", namespace.create_pipe_server)
    monkeypatch.setattr(pipes, "connect_pipe", namespace.connect_pipe)
    yield namespace


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def _config() -> dict[str, Any]:
    config = base_config(PIPE)
    config["outbounds"].insert(0, {"type": "direct", "tag": "proxy"})
    return config


# -- the whole protocol over a pipe ------------------------------------------------------------


async def test_requests_and_subscriptions_over_the_pipe(fake_pipes: FakePipes) -> None:
    async with control_daemon(_config(), _outbounds()) as running:
        assert running.path == PIPE
        server = fake_pipes.servers[PIPE]
        async with await ControlClient.connect(PIPE) as client:
            assert client.hello.daemon == "ostp-client"
            status = await client.status()
            assert isinstance(status, DaemonStatus) and status.state == "running"
            assert [o.id for o in status.outbounds] == ["proxy", "direct", "block"]
            assert (await client.routes()).default_outbound == "direct"
            with pytest.raises(ControlError) as unknown:
                await client.call("teleport")
            assert unknown.value.code == "unknown_method"

            subs = {}
            for topic in TOPICS:
                result = await client.subscribe(topic, interval_ms=50, backlog=5)
                subs[result.subscription] = topic
            await client.reconnect("proxy")  # a log line for the logs subscription
            seen: dict[str, Any] = {}
            with anyio.fail_after(10):
                async for event in client.events():
                    assert subs[event.subscription] == event.topic
                    seen.setdefault(event.topic, event.data)
                    if len(seen) == len(TOPICS):
                        break
            assert LogBatch.model_validate(seen["logs"]).lines
            status_sub = next(s for s, t in subs.items() if t == "status")
            await client.unsubscribe(status_sub)
            with pytest.raises(ControlError):
                await client.unsubscribe(status_sub)
        with anyio.fail_after(10):  # the client's subscriptions go away with it
            while running.server.clients:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        served = server.accepted[0]
        assert served.closed and fake_pipes.clients[0].closed
        assert b'"type":"hello"' in served.written or b'"type": "hello"' in served.written
    # the daemon stopped: its pipe server is gone, and a client is told so
    assert server.closed and PIPE not in fake_pipes.servers
    with pytest.raises(ControlConnectionError, match="no daemon"):
        await ControlClient.connect(PIPE)


async def test_malformed_lines_over_the_pipe(fake_pipes: FakePipes) -> None:
    async with control_daemon(_config(), _outbounds()) as running:
        reader, writer = await open_pipe_streams(PIPE)

        async def message() -> Any:
            with anyio.fail_after(10):
                return parse_server_message(await reader.readline())

        assert (await message()).type == "hello"
        writer.write(
            b"{not json\n" + b'{"id": 7, "method": 5}\n' + b'{"id": 8, "method": "status"}\n'
        )
        await writer.drain()
        replies = [await message() for _ in range(3)]
        assert all(isinstance(r, Response) for r in replies)
        assert [r.ok for r in replies] == [False, False, True]
        assert [r.id for r in replies] == [None, 7, 8]
        assert running.server.malformed_lines == 2
        writer.write(b"x" * (MAX_LINE + 10) + b"\n")  # cannot resync: answered, then closed
        await writer.drain()
        too_long = await message()
        assert isinstance(too_long, Response) and too_long.error is not None
        assert too_long.error.code == "malformed"
        with anyio.fail_after(10):
            assert await reader.read() == b""  # the daemon hung up
        writer.close()
        await writer.wait_closed()


async def test_a_pipe_served_by_someone_else_is_refused(fake_pipes: FakePipes) -> None:
    fake_pipes.foreign.add(PIPE)
    with pytest.raises(ExceptionGroup) as refused:
        async with control_daemon(_config(), _outbounds()):
            pytest.fail("the daemon started on a pipe someone else serves")
    error = refused.value.exceptions[0]
    assert isinstance(error, StartError)
    assert str(error) == (
        f"control socket {PIPE} is in use by another process; stop it or set control.socket"
    )
    with pytest.raises(ControlConnectionError, match="another user"):
        await ControlClient.connect(PIPE)


async def test_a_second_daemon_on_a_live_pipe_fails_and_names_the_first(
    fake_pipes: FakePipes,
) -> None:
    async with control_daemon(_config(), _outbounds()) as running:
        with pytest.raises(StartError) as refused:
            await ControlServer(running.daemon, PIPE).run()
        assert str(refused.value) == (
            f"control socket {PIPE} is in use by a running daemon (pid {os.getpid()}); "
            "stop it or set control.socket"
        )
        async with await ControlClient.connect(PIPE) as client:  # the first one still serves
            assert (await client.status()).state == "running"


async def test_a_daemon_that_goes_away_drops_its_clients(fake_pipes: FakePipes) -> None:
    async with control_daemon(_config(), _outbounds()):
        client = await ControlClient.connect(PIPE)
        await client.subscribe("status", interval_ms=50)
        fake_pipes.servers[PIPE].accepted[0].cancel()  # the daemon's end breaks
        with anyio.fail_after(10), pytest.raises(ControlConnectionError):
            async for _ in client.events():
                pass
        assert not client.connected
        with pytest.raises(ControlConnectionError):
            await client.status()
        await client.aclose()


# -- the listener and stream on their own -----------------------------------------------------


async def test_listener_serves_at_most_max_clients_at_once(fake_pipes: FakePipes) -> None:
    backend = fake_pipes.create_pipe_server(PIPE)
    assert isinstance(backend, FakePipeServer)
    greeted: list[int] = []
    release = anyio.Event()

    async def handler(stream: anyio.abc.ByteStream) -> None:
        number = len(greeted) + 1
        greeted.append(number)
        await stream.send(b"hello %d\n" % number)
        if number == 1:
            await release.wait()

    listener = PipeListener(backend, max_clients=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        first = fake_pipes.connect_pipe(PIPE)
        assert await anyio.to_thread.run_sync(first.read, 100) == b"hello 1\n"
        second = fake_pipes.connect_pipe(PIPE)
        # the only slot is taken: no second accept may start (a bounded look, not a timing)
        with anyio.move_on_after(0.3):
            while backend.accept_calls == 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert backend.accept_calls == 1 and greeted == [1]
        release.set()
        assert await anyio.to_thread.run_sync(second.read, 100) == b"hello 2\n"
        assert await anyio.to_thread.run_sync(first.read, 100) == b""  # handler ended: closed
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert backend.cancelled and backend.closed


async def test_stream_maps_pipe_ends_to_anyio_errors() -> None:
    ours, theirs = pipe_pair()
    stream = PipeByteStream(ours, anyio.CapacityLimiter(2))
    theirs.write(b"ping")
    assert await stream.receive() == b"ping"
    await stream.send(b"pong")
    assert await anyio.to_thread.run_sync(theirs.read, 10) == b"pong"
    theirs.close()
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    with pytest.raises(anyio.BrokenResourceError):
        await stream.send(b"late")
    with pytest.raises(NotImplementedError):
        await stream.send_eof()
    await stream.aclose()
    assert ours.closed
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


async def test_a_cancelled_receive_cancels_the_pipe_io() -> None:
    ours, theirs = pipe_pair()
    stream = PipeByteStream(ours, anyio.CapacityLimiter(2))
    with anyio.move_on_after(0.05):
        await stream.receive()  # nothing comes: the deadline cancels the blocked read
    assert ours.cancelled  # so the worker thread returned, not left blocked forever
    with pytest.raises(anyio.BrokenResourceError):
        await stream.receive()
    with pytest.raises(BrokenPipeError):
        theirs.write(b"x")  # the peer sees the pipe end


async def test_windows_paths_and_descriptor() -> None:
    assert pipes.is_pipe_path(PIPE) and pipes.is_pipe_path(PIPE.upper())
    assert not pipes.is_pipe_path("/run/user/1000/ostp-client/control.sock")
    sid = "S-1-5-21-1-2-3-1001"
    assert pipes.owner_only_sddl(sid) == f"O:{sid}D:P(A;;GA;;;{sid})"
    with pytest.raises(StartError, match="named pipe"):
        await open_pipe_listener(r"C:\ostp\control.sock")


def test_real_pipes_are_windows_only() -> None:
    with pytest.raises(OSError, match="Windows only"):
        pipes.create_pipe_server(PIPE)
    with pytest.raises(OSError, match="Windows only"):
        pipes.connect_pipe(PIPE)
