"""The control socket against a real in-process daemon: every request and subscription,
errors, malformed input, socket permissions, reload."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from fuzz.control_protocol import test_one_input as fuzz_control
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostp_client.control.client import ControlClient, ControlError
from ostp_client.control.logs import LogRing
from ostp_client.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    TOPICS,
    ConnectionList,
    DaemonStatus,
    LogBatch,
    Request,
    Response,
    RouteTable,
    parse_server_message,
)
from ostp_client.control.server import ControlServer
from ostp_client.flow import Address
from ostp_client.inbounds.base import StartError
from ostp_client.inbounds.proxy.socks5 import encode_address
from ostp_client.outbounds.block import BlockOutbound
from ostp_client.outbounds.direct import DirectOutbound
from tests.client.proxy_helpers import Origin, proxy_port, run_origin, wait_for
from tests.tui.live import FakeSessionOutbound, base_config, control_daemon, short_socket_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with run_origin() as server:
        yield server


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """`ostp-client run` sets the level from the config; here the ring should see info lines."""
    caplog.set_level(logging.INFO)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_socket_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _outbounds() -> dict[str, Any]:
    return {
        "proxy": FakeSessionOutbound("proxy"),
        "direct": DirectOutbound("direct"),
        "block": BlockOutbound("block"),
    }


def _config(sock_dir: Path, **extra: Any) -> dict[str, Any]:
    config = base_config(str(sock_dir / "run" / "control.sock"), **extra)
    config["outbounds"].insert(0, {"type": "direct", "tag": "proxy"})
    return config


async def _socks_connect(port: int, target: Address) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(b"\x05\x01\x00\x05\x01\x00" + encode_address(target))
    reply = b""
    while len(reply) < 12:
        reply += await stream.receive()
    assert reply[:4] == b"\x05\x00\x05\x00"
    return stream


class RawConnection:
    """The wire itself: lines in, parsed messages out."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, path: str) -> RawConnection:
        raw = cls(await anyio.connect_unix(path))
        hello = parse_server_message(await raw.line())
        assert hello.type == "hello"
        return raw

    async def line(self) -> bytes:
        with anyio.fail_after(10):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive()
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    async def response(self) -> Response:
        while True:
            message = parse_server_message(await self.line())
            if isinstance(message, Response):
                return message


async def test_hello_and_every_request(sock_dir: Path, origin: Origin) -> None:
    outbounds = _outbounds()
    fake = outbounds["proxy"]
    config = _config(sock_dir)
    config["routing"]["rules"].insert(0, {"port": [origin.port], "outbound": "direct"})
    async with (
        control_daemon(config, outbounds) as running,
        await ControlClient.connect(running.path) as client,
    ):
        assert client.hello.protocol == PROTOCOL_VERSION
        assert client.hello.daemon == "ostp-client"
        for method in ("status", "connections", "routes", "logs", "reconnect", "reload"):
            assert method in client.hello.methods
        assert (await client.call("hello"))["protocol"] == PROTOCOL_VERSION

        status = await client.status()
        assert status.state == "running"
        assert status.pid == os.getpid()
        assert [o.id for o in status.outbounds] == ["proxy", "direct", "block"]
        proxy = status.outbounds[0]
        assert proxy.type == "ostp"
        assert proxy.state == "connected"  # the fake is connected after its first look
        assert (proxy.server, proxy.rtt_ms) == ("192.0.2.1:8443", 12.5)
        assert proxy.mapped_address == "198.51.100.7:40000"
        assert proxy.can_reconnect
        (session,) = proxy.sessions
        assert session.id == "0"
        assert session.server == "192.0.2.1:8443"  # inherited from the outbound
        assert session.uptime is not None and session.uptime > 0  # from connected_since
        assert not status.outbounds[1].can_reconnect
        assert status.inbounds[0].tag == "proxy-in"

        stream = await _socks_connect(proxy_port(running.daemon), Address("127.0.0.1", origin.port))
        request = b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send(request)
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 100:
            received += await stream.receive()
        (conn,) = (await client.connections()).connections
        assert conn.destination == f"127.0.0.1:{origin.port}"
        assert (conn.inbound, conn.rule, conn.outbound) == ("proxy-in", 0, "direct")
        assert conn.bytes_up == len(request)
        assert conn.bytes_down == len(received)

        routes = await client.routes()
        assert [(r.index, r.outbound, r.hits) for r in routes.rules] == [
            (0, "direct", 1),
            (1, "block", 0),
            (None, "direct", 0),
        ]
        assert routes.rules[0].match == f"port={origin.port}"
        assert routes.rules[1].match == "domain_suffix=blocked.test"

        running.server.sample(1e10)  # the direct outbound's bytes come from its connections
        direct = (await client.status()).outbounds[1]
        assert (direct.bytes_up, direct.bytes_down, direct.connections) == (
            len(request),
            len(received),
            1,
        )

        result = await client.close_connection(conn.id)
        assert str(conn.id) in result.message
        with (
            anyio.fail_after(10),
            pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
        ):
            while True:
                await stream.receive()
        await stream.aclose()
        await wait_for(lambda: not running.daemon.registry.live)
        with pytest.raises(ControlError) as closed_again:
            await client.close_connection(conn.id)
        assert closed_again.value.code == "not_found"
        with pytest.raises(ControlError) as bad_id:
            await client.call("close_connection", id="7")
        assert bad_id.value.code == "invalid_params"

        assert fake.reconnect_calls == 0
        await client.reconnect("proxy")
        assert fake.reconnect_calls == 1
        assert (await client.status()).outbounds[0].reconnects == 1
        with pytest.raises(ControlError) as unsupported:
            await client.reconnect("direct")
        assert unsupported.value.code == "unsupported"
        with pytest.raises(ControlError) as missing:
            await client.reconnect("nope")
        assert missing.value.code == "not_found"

        logs = await client.logs(limit=500)
        messages = [line.message for line in logs.lines]
        assert any("control socket on" in m for m in messages)
        assert any("reconnect outbound proxy" in m for m in messages)
        assert any(f"closed connection #{conn.id}" in m for m in messages)
        newest = logs.lines[-1].seq
        assert (await client.logs(after=newest)).lines == []
        warnings = await client.logs(level="warning")
        assert all(line.level in ("warning", "error", "critical") for line in warnings.lines)
        assert len((await client.logs(limit=1)).lines) == 1

        with pytest.raises(ControlError) as no_path:
            await client.reload()  # the daemon was not started from a file
        assert no_path.value.code == "invalid_params"


async def test_unknown_request_is_an_error(sock_dir: Path) -> None:
    async with (
        control_daemon(_config(sock_dir), _outbounds()) as running,
        await ControlClient.connect(running.path) as client,
    ):
        with pytest.raises(ControlError) as unknown:
            await client.call("format_disk")
        assert unknown.value.code == "unknown_method"
        assert "format_disk" in unknown.value.message
        assert (await client.status()).state == "running"  # still answering


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("logs", {"limit": -5}),
        ("logs", {"after": -1}),
        ("logs", {"limit": "5"}),
        ("logs", {"limit": True}),
        ("logs", {"level": "loud"}),
        ("subscribe", {"topic": "logs", "backlog": -1}),
        ("subscribe", {"topic": "status", "interval_ms": -100}),
        ("subscribe", {"topic": "nothing"}),
    ],
)
async def test_bad_params_are_refused(sock_dir: Path, method: str, params: dict[str, Any]) -> None:
    async with (
        control_daemon(_config(sock_dir), _outbounds()) as running,
        await ControlClient.connect(running.path) as client,
    ):
        with pytest.raises(ControlError) as refused:
            await client.call(method, **params)
        assert refused.value.code == "invalid_params"
        name = next(iter(params)) if method == "logs" else list(params)[-1]
        assert f"params.{name}" in refused.value.message
        assert (await client.status()).state == "running"  # the connection stays
        assert (await client.logs(limit=0)).lines == []  # 0 is a valid count


async def test_malformed_lines_do_not_kill_the_connection(sock_dir: Path) -> None:
    async with control_daemon(_config(sock_dir), _outbounds()) as running:
        raw = await RawConnection.open(running.path)
        bad = [
            b"garbage",
            b"[1, 2]",
            b'{"id": 1}',
            b"\xff\xfe\x00",
            b'{"id": 3, "method": "status", "params": [1]}',
            b'{"id": {"x": 1}, "method": "status"}',
            b'{"id": 5, "method": "logs", "params": {"limit": "ten"}}',
            b'{"id": 6, "method": "subscribe", "params": {"topic": "weather"}}',
            b'{"id": 7, "method": "status", "surprise": true}',
        ]
        for line in bad:
            await raw.stream.send(line + b"\n")
        responses = [await raw.response() for _ in bad]
        assert all(not r.ok and r.error is not None for r in responses)
        assert [r.id for r in responses] == [None, None, 1, None, 3, None, 5, 6, 7]
        codes = [r.error.code for r in responses if r.error]
        assert codes[:5] == ["malformed"] * 5
        assert codes[6:8] == ["invalid_params", "invalid_params"]
        await raw.stream.send(b"\n   \n")  # blank lines are ignored
        rng = random.Random(1234)
        for _ in range(50):
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            await raw.stream.send(junk.replace(b"\n", b"") + b"\n")
            assert not (await raw.response()).ok
        await raw.stream.send(b'{"id": "last", "method": "status"}\n')
        last = await raw.response()
        assert (last.id, last.ok) == ("last", True)
        DaemonStatus.model_validate(last.result)
        assert running.server.malformed_lines >= 6

        await raw.stream.send(b"x" * (MAX_LINE + 10) + b"\n")  # cannot resync: answered, closed
        too_long = await raw.response()
        assert not too_long.ok
        await raw.stream.aclose()
        async with await ControlClient.connect(running.path) as client:  # the daemon lives on
            assert (await client.status()).state == "running"


async def test_subscriptions(sock_dir: Path) -> None:
    async with (
        control_daemon(_config(sock_dir), _outbounds()) as running,
        await ControlClient.connect(running.path) as client,
    ):
        subs = {}
        for topic in TOPICS:
            result = await client.subscribe(topic, interval_ms=50, backlog=5)
            subs[result.subscription] = topic
        await client.reconnect("proxy")  # logs a line for the logs subscription
        seen: dict[str, Any] = {}
        with anyio.fail_after(10):
            async for event in client.events():
                assert subs[event.subscription] == event.topic
                seen.setdefault(event.topic, event.data)
                if len(seen) == len(TOPICS):
                    break
        DaemonStatus.model_validate(seen["status"])
        ConnectionList.model_validate(seen["connections"])
        assert RouteTable.model_validate(seen["routes"]).default_outbound == "direct"
        assert LogBatch.model_validate(seen["logs"]).lines

        status_sub = next(s for s, t in subs.items() if t == "status")
        await client.unsubscribe(status_sub)
        with pytest.raises(ControlError) as twice:
            await client.unsubscribe(status_sub)
        assert twice.value.code == "not_found"
        with pytest.raises(ControlError) as bad:
            await client.subscribe("weather")
        assert bad.value.code == "invalid_params"
        await client.aclose()
        with anyio.fail_after(10):  # the client's subscriptions go away with it
            while running.server.clients:  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def test_log_subscription_streams_new_lines(sock_dir: Path) -> None:
    async with (
        control_daemon(_config(sock_dir), _outbounds()) as running,
        await ControlClient.connect(running.path) as client,
    ):
        await client.subscribe("logs", level="info")
        for n in range(3):
            await client.reconnect("proxy")
            with anyio.fail_after(10):
                async for event in client.events():
                    batch = LogBatch.model_validate(event.data)
                    if any("reconnect outbound proxy" in x.message for x in batch.lines):
                        break
            assert running.daemon.outbounds["proxy"].reconnect_calls == n + 1  # type: ignore[attr-defined]


def test_log_ring_is_bounded_and_counts_drops() -> None:
    ring = LogRing(capacity=3)
    logger = logging.getLogger("test.ring")
    logger.addHandler(ring)
    logger.setLevel("DEBUG")
    try:
        for n in range(5):
            logger.info("line %d", n)
        logger.error("boom")
    finally:
        logger.removeHandler(ring)
    assert [line.message for line in ring.lines] == ["line 3", "line 4", "boom"]
    batch = ring.since(0)
    assert batch.dropped == 3
    assert ring.since(5).lines[0].message == "boom" and ring.since(5).dropped == 0
    assert [x.message for x in ring.since(0, level="error").lines] == ["boom"]


async def test_socket_permissions(sock_dir: Path) -> None:
    path = sock_dir / "run" / "control.sock"
    async with control_daemon(_config(sock_dir), _outbounds()) as running:
        assert running.path == str(path)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        # a second daemon on the same path refuses to take the socket over (it cannot start)
        second = ControlServer(running.daemon, str(path))
        with anyio.fail_after(10), pytest.raises(StartError) as refused:
            await second.run()
        assert str(refused.value) == (
            f"control socket {path} is in use by a running daemon (pid {os.getpid()}); "
            "stop it or set control.socket"
        )
        async with await ControlClient.connect(str(path)) as client:
            assert (await client.status()).state == "running"
    assert not path.exists()  # removed at exit


async def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "run" / "control.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    async with (
        control_daemon(_config(sock_dir), _outbounds()) as running,
        await ControlClient.connect(running.path) as client,
    ):
        assert (await client.status()).state == "running"


@pytest.mark.root  # chown: a directory owned by another user
async def test_directory_of_another_user_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "run" / "control.sock"
    path.parent.mkdir(mode=0o777)
    os.chown(path.parent, 65534, 65534)
    with pytest.raises(ExceptionGroup) as refused:
        async with control_daemon(_config(sock_dir), _outbounds()):
            pytest.fail("the daemon started with a socket directory of another user")
    error = refused.value.exceptions[0]
    assert isinstance(error, StartError)
    assert (
        str(error) == f"control socket {path}: {path.parent} belongs to another user; not using it"
    )
    assert not path.exists()


async def test_reload(sock_dir: Path) -> None:
    config_file = sock_dir / "cfg.json"
    config = _config(sock_dir)
    config_file.write_text(json.dumps(config))
    async with (
        control_daemon(config, _outbounds(), str(config_file)) as running,
        await ControlClient.connect(running.path) as client,
    ):
        result = await client.reload()
        assert result.applied == [] and result.needs_restart == []

        config["routing"]["rules"].append({"domain": ["example.com"], "outbound": "proxy"})
        config["log"] = {"level": "debug"}
        config_file.write_text(json.dumps(config))
        result = await client.reload()
        assert result.applied == ["routing", "log.level"]
        routes = await client.routes()
        assert [r.match for r in routes.rules] == [
            "domain_suffix=blocked.test",
            "domain=example.com",
            "(default)",
        ]
        assert running.daemon.dispatcher.router is running.daemon.router

        broken = dict(config, routing={"rules": [{"domain": ["x"], "outbound": "nowhere"}]})
        config_file.write_text(json.dumps(broken))
        with pytest.raises(ControlError) as refused:
            await client.reload()
        assert refused.value.code == "invalid_config"
        assert "nowhere" in refused.value.message
        config_file.write_text("{ not json")
        with pytest.raises(ControlError) as garbage:
            await client.reload()
        assert garbage.value.code == "invalid_config"
        assert [r.match for r in (await client.routes()).rules] == [
            r.match for r in routes.rules
        ]  # the running config stayed

        config["outbounds"].append({"type": "direct", "tag": "extra"})
        config_file.write_text(json.dumps(config))
        result = await client.reload()
        assert (result.applied, result.needs_restart) == (["outbounds"], [])
        other = sock_dir / "other.json"
        other.write_text(json.dumps(_config(sock_dir)))
        result = await client.reload(str(other))
        assert result.applied == ["routing", "log.level", "outbounds"]


def test_request_model_round_trip() -> None:
    request = Request(id="a", method="logs", params={"limit": 3})
    assert Request.model_validate_json(request.model_dump_json()) == request


@given(st.binary(max_size=300))
def test_fuzz_entry_point_bytes(data: bytes) -> None:
    fuzz_control(data)


# Bounded on purpose: unbounded dictionaries under seven keys made inputs so large that Hypothesis
# discarded many for exceeding its size limit and failed HealthCheck.too_slow on a busy machine.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


# Generating nested JSON is the slow part here, and how slow depends on what else the machine
# runs, not on the code under test: no deadline and no too_slow health check (conftest's
# profiles do the same for every property test; this test says so itself because it failed).
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": _json,
            "method": _json,
            "params": _json,
            "type": st.sampled_from(["hello", "response", "event", "x"]),
            "ok": _json,
            "topic": _json,
            "subscription": _json,
        },
    )
)
def test_fuzz_entry_point_json_objects(data: dict[str, Any]) -> None:
    fuzz_control(json.dumps(data).encode())


# --------------------------------------------------------------------------------------------
# a client that vanishes while a subscription writes to it


async def test_a_send_to_a_vanished_client_leaves_the_read_to_its_reader() -> None:
    """The client is gone; a subscription's write fails while the client's task waits to read.

    Closing the stream from the writing task completed the reader's pending future under it:
    when the socket's readiness callback (already queued by the same loop turn) ran, asyncio
    logged "Exception in callback Future.set_result(None)" with an InvalidStateError (anyio's
    Unix streams on asyncio). The write must end the connection for the reader instead."""
    import asyncio

    from ostp_client.control.protocol import Hello
    from ostp_client.control.server import _Client

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    directory = short_socket_dir()
    try:
        listener = await anyio.create_unix_listener(directory / "s.sock")
        # The write must fail in the loop turn in which the reader's readiness callback is
        # queued: close the peer after 0-3 turns (the write itself takes one or two).
        for hops in [0, 1, 2, 3] * 5:
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(str(directory / "s.sock"))
            stream = await listener.accept()
            client = _Client(stream)
            ended = anyio.Event()

            async def read(
                stream: anyio.abc.SocketStream = stream, ended: anyio.Event = ended
            ) -> None:
                with pytest.raises(
                    (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)
                ):
                    await stream.receive()
                ended.set()

            def close_later(hops: int, peer: socket.socket = peer) -> None:
                if hops:
                    loop.call_soon(close_later, hops - 1)
                else:
                    peer.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.wait_all_tasks_blocked()
                close_later(hops)
                await client.send(Hello())  # fails when the client is already gone
                with anyio.fail_after(5):
                    await ended.wait()  # and the reader learns that it is gone
            await stream.aclose()
        await listener.aclose()
        await anyio.sleep(0.05)  # let any callback still queued run (and fail) before checking
        assert not errors, [str(e.get("exception")) + " " + e.get("message", "") for e in errors]
    finally:
        loop.set_exception_handler(previous)
        shutil.rmtree(directory)
