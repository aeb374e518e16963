"""NAT traversal on the session socket, end to end: real curl → ostp-client (STUN/TURN on each
session's one UDP socket) → a real coturn → a real ostp-server → a local origin."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ostp_client.nat.stun import MessageClass, Method, encode_message
from ostp_client.outbounds.ostp import OstpOutbound, _Session
from ostp_client.transport.udp import NatSocket
from ostp_sockets import BatchSocket
from tests.client.coturn_helpers import Coturn, requires_coturn, running_coturn
from tests.client.origin_server import body_sha256
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
from tests.client.tunnel_helpers import LossyRelay, ServerProcess, ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60), requires_coturn]

MB = 1024 * 1024
PASSWORD = "p"


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path) as running:
        yield running


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    with running_coturn(tmp_path) as running:
        yield running


def _config(server: ServerProcess, nat: dict[str, Any] | None, port: int | None = None) -> Any:
    extra: dict[str, Any] = {"reconnect_delay": 0.3}
    if nat is not None:
        extra["nat"] = nat
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [server.outbound(port, **extra), {"type": "direct", "tag": "direct"}],
        "routing": {"rules": [], "default_outbound": "proxy"},
    }


def _turn(coturn: Coturn, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
    return {"server": coturn.url, "username": "u", "password": password, **extra}


def _ostp(daemon: Any) -> OstpOutbound:
    outbound = daemon.outbounds["proxy"]
    assert isinstance(outbound, OstpOutbound)
    return outbound


def _session(daemon: Any) -> _Session:
    return _ostp(daemon).sessions[0]


async def _connected(daemon: Any, limit: float = 20) -> None:
    await wait_for(lambda: _ostp(daemon).state == "connected", limit)


async def _download(daemon: Any, origin: Origin, size: int, out: Path, *args: str) -> None:
    url = origin.url(f"/bytes/{size}")
    result = await curl(
        [*proxy_args("socks5h", proxy_port(daemon)), *args, "-o", str(out), url], time_limit=45
    )
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(await anyio.Path(out).read_bytes()).hexdigest()
    assert digest == body_sha256(size)


async def _upload(daemon: Any, origin: Origin, data: bytes, tmp: Path, *args: str) -> None:
    upload = tmp / "upload"
    upload.write_bytes(data)
    result = await curl(
        [
            *proxy_args("socks5h", proxy_port(daemon)),
            *args,
            "--data-binary",
            f"@{upload}",
            origin.url("/upload"),
        ],
        time_limit=45,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


async def test_binding_shows_the_sockets_own_address(
    origin: Origin, server: ServerProcess, coturn: Coturn, tmp_path: Path
) -> None:
    nat = {"mode": "direct", "stun": [coturn.url]}
    async with running_daemon(_config(server, nat)) as daemon:
        await _connected(daemon)
        await wait_for(lambda: _session(daemon).nat_path.mapped_address is not None)
        session = _session(daemon)
        assert isinstance(session.batch, NatSocket)  # not connected: it talks to STUN too
        assert session.sock is not None
        port = session.sock.getsockname()[1]
        status = _ostp(daemon).status()
        # On loopback there is no NAT: the mapping is the socket's own address.
        assert status.sessions[0].mapped_address == f"127.0.0.1:{port}"
        assert status.mapped_address == f"127.0.0.1:{port}"
        assert status.nat_mode == "direct"
        assert status.sessions[0].path == "direct"
        await _download(daemon, origin, 2 * MB, tmp_path / "body")


@pytest.mark.parametrize("nat", [None, {"mode": "direct"}, {"mode": "auto"}])
async def test_sessions_without_stun_or_turn_keep_the_connected_batched_socket(
    server: ServerProcess, coturn: Coturn, nat: dict[str, Any] | None
) -> None:
    if nat is not None and nat["mode"] == "auto":
        nat = {**nat, "turn": _turn(coturn)}
    async with running_daemon(_config(server, nat)) as daemon:
        await _connected(daemon)
        session = _session(daemon)
        assert isinstance(session.batch, BatchSocket)
        assert session.sock is not None and session.sock.getpeername()[1] == server.port
        assert session.snapshot().path == "direct"


async def test_20mb_byte_exact_through_turn(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    with running_coturn(tmp_path, "--verbose") as coturn:
        await _through_turn(origin, server, coturn, tmp_path)


async def _through_turn(
    origin: Origin, server: ServerProcess, coturn: Coturn, tmp_path: Path
) -> None:
    nat = {"mode": "turn", "turn": _turn(coturn)}
    async with running_daemon(_config(server, nat)) as daemon:
        await _connected(daemon)
        session = _session(daemon)
        assert session.mux is not None and session.mux.relaying
        status = session.snapshot()
        assert status.path == "turn"
        assert str(status.relayed_address).startswith("127.0.0.1:")
        # TURN's XOR-MAPPED-ADDRESS shows the mapping even without STUN servers.
        assert session.sock is not None
        assert status.mapped_address == f"127.0.0.1:{session.sock.getsockname()[1]}"
        await _download(daemon, origin, 20 * MB, tmp_path / "body")
        assert session.mux.relaying and session.reconnects == 0
    # Shutdown released the allocation (Refresh with LIFETIME 0, RFC 8656 §7).
    await wait_for(lambda: "lifetime=0" in coturn.log_text().lower().replace(" ", ""), 5)


async def test_auto_falls_back_to_turn_when_direct_udp_is_dropped(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    # coturn relays from 127.0.0.2; the relay in front of the server lets only that through.
    with (
        running_coturn(tmp_path, relay_ip="127.0.0.2") as coturn,
        LossyRelay(server.port, 0.0, allowed_host="127.0.0.2") as relay,
    ):
        nat = {"mode": "auto", "turn": _turn(coturn)}
        async with running_daemon(_config(server, nat, port=relay.port)) as daemon:
            await _connected(daemon, limit=30)
            session = _session(daemon)
            status = session.snapshot()
            assert status.path == "turn"
            assert str(status.relayed_address).startswith("127.0.0.2:")
            assert session.reconnects >= 1  # the direct attempt, then the relayed one
            await _download(daemon, origin, 2 * MB, tmp_path / "body")
        assert relay.dropped > 0  # the direct handshakes really were dropped
        assert relay.forwarded > 0


async def test_wrong_password_is_a_clear_error_logged_once(
    server: ServerProcess, coturn: Coturn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "not-the-password-42"
    nat = {"mode": "turn", "turn": _turn(coturn, password=secret)}
    async with running_daemon(_config(server, nat)) as daemon:
        await wait_for(lambda: _session(daemon).reconnects >= 2, 20)
        status = _ostp(daemon).status()
        last_error = status.sessions[0].last_error
        assert status.state == "connecting"
        assert last_error is not None and "rejected the credentials" in last_error
        assert "username and password" in last_error
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "credentials" in r.message
    ]
    assert len(warnings) == 1, [r.message for r in warnings]
    assert secret not in caplog.text
    assert secret not in repr(status)


async def test_short_lifetimes_are_refreshed_during_a_transfer(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    # coturn grants at least 600 s to an allocation and (4.6.1, coturn issue #439) ignores
    # --channel-lifetime/--permission-lifetime, so the lifetimes are shortened on our side: the
    # allocation is refreshed after 3 s (600 s x 0.005), permission and channel every 2 s, all
    # while a paced upload keeps the relay busy for about 10 s. coturn must accept every refresh.
    with running_coturn(tmp_path, "--verbose") as ct:
        turn = _turn(ct, refresh_fraction=0.005, permission_refresh=2.0, channel_refresh=2.0)
        async with running_daemon(_config(server, {"mode": "turn", "turn": turn})) as daemon:
            await _connected(daemon)
            session = _session(daemon)
            before = session.nat_path.turn_refreshes
            await _upload(daemon, origin, os.urandom(5 * MB), tmp_path, "--limit-rate", "512K")
            assert session.nat_path.turn_refreshes - before >= 6
            assert session.reconnects == 0 and session.snapshot().last_error is None
            assert session.mux is not None and session.mux.relaying
    log = ct.log_text()
    assert log.count("REFRESH processed, success") >= 2
    assert log.count("CREATE_PERMISSION processed, success") >= 3
    assert log.count("CHANNEL_BIND processed, success") >= 3
    assert "processed, error" not in log.split("ALLOCATE processed, success", 1)[1]


async def test_stale_nonce_is_handled(
    origin: Origin, server: ServerProcess, tmp_path: Path
) -> None:
    with running_coturn(tmp_path, "--stale-nonce=2") as ct:
        turn = _turn(ct, refresh_fraction=0.005, permission_refresh=2.5, channel_refresh=2.5)
        async with running_daemon(_config(server, {"mode": "turn", "turn": turn})) as daemon:
            await _connected(daemon)
            session = _session(daemon)

            def stale_retries() -> int:
                mux = session.mux
                return mux.turn.stale_nonce_retries if mux and mux.turn else 0

            await wait_for(lambda: stale_retries() > 0 and session.nat_path.turn_refreshes >= 4, 20)
            await _download(daemon, origin, 2 * MB, tmp_path / "body")
            assert session.reconnects == 0 and session.snapshot().last_error is None


def _break_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes((data[-1] ^ 0xFF,))


@pytest.mark.parametrize("mode", ["turn", "direct"])
async def test_stray_stun_looking_datagrams_do_not_disturb(
    origin: Origin, server: ServerProcess, coturn: Coturn, tmp_path: Path, mode: str
) -> None:
    nat: dict[str, Any] = {"mode": mode, "stun": [coturn.url]}
    if mode == "turn":
        nat["turn"] = _turn(coturn)
    async with running_daemon(_config(server, nat)) as daemon:
        await _connected(daemon)
        session = _session(daemon)
        await wait_for(lambda: session.nat_path.mapped_address is not None)
        assert session.sock is not None
        target = ("127.0.0.1", session.sock.getsockname()[1])
        bogus = [
            # a success for a transaction that is not ours
            encode_message(Method.ALLOCATE, MessageClass.SUCCESS, os.urandom(12)),
            # a Binding success with a broken FINGERPRINT (every bit of its last byte flipped:
            # replacing it with a constant left the CRC intact one time in 256)
            _break_last_byte(
                encode_message(
                    Method.BINDING, MessageClass.SUCCESS, os.urandom(12), fingerprint=True
                )
            ),
            # a request: we are no STUN server
            encode_message(Method.BINDING, MessageClass.REQUEST, os.urandom(12)),
            # ChannelData-looking bytes, but not from the TURN server
            b"\x40\x00\x00\x04abcd",
            # random bytes
            os.urandom(200),
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            for _ in range(3):
                for data in bogus:
                    stray.sendto(data, target)
        await wait_for(lambda: sum((session.snapshot().nat_drops or {}).values()) >= 15)
        drops = session.snapshot().nat_drops or {}
        assert drops["stun_unknown_transaction_drop"] >= 3
        assert drops["stun_fingerprint_drop"] >= 3
        assert drops["stun_unexpected_drop"] >= 3
        assert drops["ostp_source_drop"] >= 6  # not from the server: never fed to the session
        await _download(daemon, origin, 2 * MB, tmp_path / "body")
        assert session.reconnects == 0 and session.snapshot().last_error is None
        assert session.snapshot().path == mode
