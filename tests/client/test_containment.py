"""One task's failure never ends the daemon.

Control clients that hang up early (the report: a few dozen clients that send a request, half a
request or a subscribe and close without reading killed the daemon with BrokenResourceError out
of `_serve_client`), against the real `ostp-client run`; then an exception injected into each
other kind of task the daemon runs: a control subscription, the control server's sampler, a
part's `run()`, an ostp session, TUN flows.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from ostp_client.config import TunInboundConfig, parse_config_text
from ostp_client.connections import ConnectionRegistry, Dispatcher
from ostp_client.control.client import ControlClient
from ostp_client.control.server import ControlServer
from ostp_client.flow import ConnContext, OutboundReport, UdpOutboundSession
from ostp_client.inbounds.base import InboundReport
from ostp_client.inbounds.tun.device import TunDevice
from ostp_client.inbounds.tun.inbound import TunInbound
from ostp_client.outbounds.direct import DirectOutbound
from ostp_client.outbounds.ostp import OstpOutbound, _Session
from ostp_client.router import Router
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
from tests.tui.live import base_config, control_daemon, program, short_socket_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


# --------------------------------------------------------------------------------------------
# control clients that hang up (a real daemon process)

WHOLE = b'{"id": 1, "method": "status"}\n'
HALF = b'{"id": 1, "meth'
SUBSCRIBE = b'{"id": 2, "method": "subscribe", "params": {"topic": "status", "interval_ms": 50}}\n'


def _hang_up(path: str, data: bytes, *, wait_for_hello: bool, linger: bool) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.settimeout(10)
        sock.connect(path)
        if wait_for_hello:
            # the hello is in our receive queue, unread: closing now resets the daemon's side
            assert select.select([sock], [], [], 10)[0]
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):  # the daemon may have dropped us: fine, dying is not
            sock.sendall(data)
    finally:
        sock.close()


def _status(path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b'{"id": "s", "method": "status"}\n')
        data = b""
        while data.count(b"\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    reply: dict[str, Any] = json.loads(data.split(b"\n")[1])
    assert reply["id"] == "s" and reply["ok"], reply
    return reply


def test_control_clients_that_hang_up_early_do_not_end_the_daemon(tmp_path: Path) -> None:
    sock_dir = short_socket_dir()
    path = str(sock_dir / "control.sock")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**base_config(path), "log": {"level": "info"}}))
    log = tmp_path / "daemon.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*program(), "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 30
        while "control socket on" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        # the report's sequence first: one half request, then three whole ones
        for index, data in enumerate((HALF, WHOLE, WHOLE, WHOLE)):
            _hang_up(path, data, wait_for_hello=index == 0, linger=False)
        for round_ in range(12):
            for data in (WHOLE, HALF, SUBSCRIBE, WHOLE + SUBSCRIBE + HALF):
                _hang_up(path, data, wait_for_hello=round_ % 2 == 0, linger=round_ % 3 == 0)
            assert process.poll() is None, log.read_text()[-3000:]
        status = _status(path)
        assert status["result"]["state"] == "running"
        assert status["result"]["connections_live"] == 0
        assert process.poll() is None
        text = log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for leftover in sock_dir.iterdir():
            leftover.unlink()
        sock_dir.rmdir()
    assert process.returncode == 0, log.read_text()[-3000:]


# --------------------------------------------------------------------------------------------
# exceptions injected into the daemon's other tasks (in process)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_socket_dir()
    yield directory
    for leftover in directory.rglob("*"):
        if not leftover.is_dir():
            leftover.unlink()
    for sub in sorted(directory.rglob("*"), reverse=True):
        sub.rmdir()
    directory.rmdir()


async def test_a_subscription_that_fails_ends_alone(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    real = ControlServer.routes_model

    def failing(self: ControlServer) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the subscription's first snapshot
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(ControlServer, "routes_model", failing)
    async with control_daemon(base_config(str(sock_dir / "c.sock"))) as running:
        client = await ControlClient.connect(running.path)
        await client.routes()  # call 1
        await client.call("subscribe", topic="routes", interval_ms=50)  # its task fails
        await wait_for(
            lambda: any("control subscription 2" in r.getMessage() for r in caplog.records)
        )
        status = await client.status()  # the same client goes on
        assert status.state == "running"
        again = await client.call("subscribe", topic="status", interval_ms=50)
        assert again["topic"] == "status"
        await client.aclose()
        await wait_for(lambda: running.server.clients == 0)


class _FailingStatusOutbound(DirectOutbound):
    """An outbound whose status() fails (a bug in a part must not stop the control server)."""

    def status(self) -> OutboundReport:
        raise RuntimeError("injected status failure")


async def test_a_failing_status_does_not_stop_the_control_server(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ostp_client.outbounds.block import BlockOutbound

    config = base_config(str(sock_dir / "c.sock"))
    outbounds = {"direct": _FailingStatusOutbound("direct"), "block": BlockOutbound("block")}
    async with control_daemon(config, outbounds) as running:
        # the inbounds' status is not guarded by status_model: make one fail too
        inbound = next(iter(running.daemon.inbounds.values()))

        def broken() -> InboundReport:
            raise RuntimeError("injected inbound status failure")

        inbound.status = broken  # type: ignore[method-assign]

        def count(text: str) -> int:
            return sum(text in record.getMessage() for record in caplog.records)

        await wait_for(lambda: count("sampling the daemon") > 0)
        # each sample logs the outbound's failure first: two more samples, the sampler lives
        samples = count("status() of outbound direct failed")
        await wait_for(lambda: count("status() of outbound direct failed") >= samples + 2)
        assert count("sampling the daemon") == 1  # said once, not at every sample
        client = await ControlClient.connect(running.path)
        connections = await client.connections()
        assert connections.connections == []
        await client.aclose()


class _DyingOutbound(DirectOutbound):
    """Starts, then fails in its background task once told to."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.die = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.die.wait()
        raise RuntimeError("injected failure in a part's run()")


async def test_a_part_that_fails_after_starting_does_not_end_the_daemon(
    origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    from ostp_client.outbounds.block import BlockOutbound

    config = {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            {"type": "direct", "tag": "direct"},
            {"type": "direct", "tag": "dying"},
            {"type": "block", "tag": "block"},
        ],
        "routing": {"rules": [], "default_outbound": "direct"},
    }
    dying = _DyingOutbound("dying")
    outbounds = {"direct": DirectOutbound("direct"), "dying": dying, "block": BlockOutbound("b")}
    async with running_daemon(config, outbounds) as daemon:
        dying.die.set()
        await wait_for(lambda: any("stopped after an error" in r.message for r in caplog.records))
        result = await curl([*proxy_args("socks5h", proxy_port(daemon)), origin.url("/bytes/10")])
        assert result.returncode == 0, result.stderr


async def test_an_ostp_session_that_fails_starts_again(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _Session._handle_events
    failures = 0

    def failing_once(self: _Session, conn: Any) -> bool:
        nonlocal failures
        if failures == 0 and self.state == "connected":
            failures += 1
            raise RuntimeError("injected failure in the session loop")
        return real(self, conn)

    monkeypatch.setattr(_Session, "_handle_events", failing_once)
    with ostp_server(tmp_path) as server:
        config = tunnel_config(server.outbound(reconnect_delay=0.2))
        async with running_daemon(config) as daemon:
            outbound = daemon.outbounds["proxy"]
            assert isinstance(outbound, OstpOutbound)
            await wait_for(lambda: failures == 1, 15)
            await wait_for(lambda: outbound.state == "connected", 15)
            args = [*proxy_args("socks5h", proxy_port(daemon)), "-o", "/dev/null"]
            result = await curl([*args, "-w", "%{size_download}", origin.url("/bytes/100000")])
            assert (result.returncode, result.stdout) == (0, "100000"), result.stderr
            session = outbound.sessions[0]
            assert session.reconnects >= 1
            assert session.last_error is None or "internal error" in session.last_error


# --------------------------------------------------------------------------------------------
# TUN flows (an in-memory device: no root needed)


class _MemoryDevice(TunDevice):
    name = "mem0"

    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()
        self.ready = anyio.Event()
        self.written: list[bytes] = []

    def inject(self, packet: bytes) -> None:
        self.inbox.append(packet)
        self.ready.set()

    async def wait_readable(self) -> None:
        while not self.inbox:
            self.ready = anyio.Event()
            await self.ready.wait()

    def read_batch(self, limit: int = 256) -> list[tuple[bytes, bool]]:
        out = [(packet, True) for packet in self.inbox]
        self.inbox.clear()
        return out

    def write_batch(self, packets: Iterable[bytes]) -> None:
        self.written.extend(packets)

    def close(self) -> None:
        pass


def _checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return head + udp


class _BuggyOutbound(DirectOutbound):
    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        raise RuntimeError("injected failure in an outbound")


async def test_a_failing_tun_flow_does_not_end_the_tun_inbound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parsed, _ = parse_config_text('{"outbounds": [{"type": "direct"}]}')
    outbounds = {"direct": _BuggyOutbound()}
    registry = ConnectionRegistry()
    dispatcher = Dispatcher(Router(parsed.routing, outbounds), outbounds, registry)
    device = _MemoryDevice()
    config = TunInboundConfig(dns_hijack=True, dns_upstream="192.0.2.53")
    inbound = TunInbound(config, dispatcher, open_device=lambda _: device, configure_system=False)
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x01a\x04test\x00\x00\x01\x00\x01"
    async with anyio.create_task_group() as tg:
        await tg.start(inbound.run)
        for port in (40000, 40001, 40002):
            # a DNS query forwarded through the outbound (its task fails), then a UDP flow
            device.inject(_udp_packet("198.18.0.2", "192.0.2.53", port, 53, query))
            device.inject(_udp_packet("198.18.0.2", "192.0.2.9", port, 9999, b"x"))
        await wait_for(lambda: inbound.counters["dns_queries"] == 3 and not registry.live)
        await wait_for(lambda: sum("task failed" in r.getMessage() for r in caplog.records) >= 3)
        assert inbound.counters["udp_flows"] == 3
        await wait_for(lambda: not inbound._udp)
        status = inbound.status()  # live flows and the total are two numbers (they were one key)
        assert status.udp_flows == 0 and status.counters["udp_flows"] == 3
        tg.cancel_scope.cancel()
    assert registry.closed_total == 6
