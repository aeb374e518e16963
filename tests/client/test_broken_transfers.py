"""A transfer that does not end cleanly reaches the application as an error, never as a short
success.

The report: a close-delimited body (HTTP/1.0, no Content-Length) through SOCKS5; SIGKILL the
server and curl exited 0 with 337 MB of 1.97 GB. Each test starts real curl on an endless
close-delimited body, waits until bytes have arrived, breaks something (the ostp-server killed,
the daemon stopped, `ctl reconnect`, `ctl close`, the origin resetting), and asserts curl fails
("Recv failure: Connection reset by peer", exit 56): the local connection was reset (RST), not
closed with FIN. A body that ends cleanly still ends cleanly, and an application that resets
makes the daemon reset its remote connection too.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from ostp_client.control.client import ControlClient
from ostp_client.daemon import Daemon
from ostp_client.flow import Address, ConnContext
from ostp_client.outbounds.ostp import OstpOutbound, OstpStream, _Session
from ostp_proto import Close, ConnectOk, Data, Error
from tests.client.origin_server import BLOCK, body_sha256
from tests.client.proxy_helpers import (
    CURL,
    Origin,
    base_config,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
    wait_for,
)
from tests.client.test_connection_leaks import _abort, _socks_connect
from tests.client.test_tunnel import tunnel_config
from tests.client.tunnel_helpers import ostp_server
from tests.tui.live import control_daemon, short_socket_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

MB = 1024 * 1024
CURL_RECV_ERROR = 56  # "Failure when receiving data from the peer"
# socks5h and HTTP CONNECT tunnel the bytes; "http" is forwarded by the proxy (h11, chunked to
# an HTTP/1.1 client), "http1.0" too but close-delimited to the client as well
MODES = ["socks5h", "connect", "http", "http1.0"]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _args(mode: str, port: int) -> list[str]:
    if mode == "http1.0":
        return [*proxy_args("http", port), "--http1.0"]
    return proxy_args(mode, port)


@asynccontextmanager
async def transfer(
    mode: str, port: int, url: str, out: Path, *, at_least: int = MB
) -> AsyncIterator[anyio.abc.Process]:
    """Real curl writing ``url`` to ``out``; entered once ``at_least`` bytes have arrived."""
    command = [CURL, "-sS", "--noproxy", "", *_args(mode, port), "-o", str(out), url]
    async with await anyio.open_process(command, stderr=subprocess.PIPE) as process:
        path = anyio.Path(out)
        with anyio.fail_after(60):
            while not (await path.exists() and (await path.stat()).st_size >= at_least):
                assert process.returncode is None, "curl ended before the transfer got going"
                await anyio.sleep(0.02)
        yield process


async def finished(process: anyio.abc.Process, time_limit: float = 60) -> tuple[int, str]:
    with anyio.fail_after(time_limit):
        code = await process.wait()
    assert process.stderr is not None
    err = b""
    async for chunk in process.stderr:
        err += chunk
    return code, err.decode(errors="replace")


def _ostp(daemon: Daemon) -> OstpOutbound:
    outbound = daemon.outbounds["proxy"]
    assert isinstance(outbound, OstpOutbound)
    return outbound


# --------------------------------------------------------------------------------------------
# the tunnel breaks


@pytest.mark.parametrize("mode", MODES)
async def test_server_killed_mid_download_resets_the_application(
    origin: Origin, tmp_path: Path, mode: str
) -> None:
    with ostp_server(tmp_path) as server:
        outbound = server.outbound(idle_timeout=2, keepalive_interval=0.5)
        async with running_daemon(tunnel_config(outbound)) as daemon:
            await wait_for(lambda: _ostp(daemon).state == "connected", 15)
            out = tmp_path / "body"
            url = origin.url("/forever")
            async with transfer(mode, proxy_port(daemon), url, out) as process:
                assert server.process is not None
                server.process.kill()  # SIGKILL: no goodbye; the session times out
                code, err = await finished(process)
            assert code == CURL_RECV_ERROR, (code, err)
            assert "reset" in err.lower(), err
            await wait_for(lambda: not daemon.registry.live)


@pytest.mark.parametrize("kind", ["ostp", "direct"])
async def test_daemon_stopped_mid_download_resets_the_application(
    origin: Origin, tmp_path: Path, kind: str
) -> None:
    with ostp_server(tmp_path) as server:
        config = tunnel_config(server.outbound())
        if kind == "direct":
            config["routing"]["default_outbound"] = "direct"
        async with running_daemon(config) as daemon:
            await wait_for(lambda: _ostp(daemon).state == "connected", 15)
            async with transfer(
                "socks5h", proxy_port(daemon), origin.url("/forever"), tmp_path / "body"
            ) as process:
                daemon.stop()
                code, err = await finished(process)
            assert code == CURL_RECV_ERROR, (code, err)
        assert not daemon.registry.live


async def test_ctl_reconnect_and_close_mid_download_reset_the_application(
    origin: Origin, tmp_path: Path
) -> None:
    sock_dir = short_socket_dir()
    try:
        with ostp_server(tmp_path) as server:
            config = tunnel_config(server.outbound(reconnect_delay=0.2))
            config["control"] = {"socket": str(sock_dir / "c.sock")}
            async with control_daemon(config) as running:
                daemon = running.daemon
                await wait_for(lambda: _ostp(daemon).state == "connected", 15)
                port = proxy_port(daemon)
                client = await ControlClient.connect(running.path)
                for action in ("reconnect", "close"):
                    out = tmp_path / f"body-{action}"
                    async with transfer("socks5h", port, origin.url("/forever"), out) as process:
                        if action == "reconnect":
                            await client.reconnect("proxy")  # tears the session down
                        else:
                            (conn,) = daemon.registry.live
                            await client.close_connection(conn)
                        code, err = await finished(process)
                    assert code == CURL_RECV_ERROR, (action, code, err)
                    await wait_for(lambda: not daemon.registry.live)
                    await wait_for(lambda: _ostp(daemon).state == "connected", 15)
                await client.aclose()
                # and a transfer that is left alone ends cleanly, on the new session
                result = await curl(
                    [
                        *proxy_args("socks5h", port),
                        "-o",
                        str(tmp_path / "after"),
                        origin.url(f"/close-delimited/{3 * MB}"),
                    ]
                )
                assert result.returncode == 0, result.stderr
                assert (tmp_path / "after").read_bytes() == BLOCK * 3
    finally:
        for leftover in sock_dir.iterdir():
            leftover.unlink()
        sock_dir.rmdir()


# --------------------------------------------------------------------------------------------
# the origin resets (direct outbound); clean ends stay clean


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ostp", "direct"])
async def test_origin_reset_mid_body_resets_the_application(
    origin: Origin, tmp_path: Path, mode: str, kind: str
) -> None:
    """Through the tunnel the server reports the remote's reset as relay Error, not Close
    (a deviation from upstream, docs/protocol-deviations.md), and the daemon resets."""
    with ostp_server(tmp_path) as server:
        config = tunnel_config(server.outbound())
        if kind == "direct":
            config["routing"]["default_outbound"] = "direct"
        async with running_daemon(config) as daemon:
            out = tmp_path / "body"
            url = origin.url(f"/reset-after/{4 * MB}")
            result = await curl([*_args(mode, proxy_port(daemon)), "-o", str(out), url])
            assert result.returncode == CURL_RECV_ERROR, result
            assert "reset" in result.stderr.lower(), result
            await wait_for(lambda: not daemon.registry.live)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ostp", "direct"])
async def test_close_delimited_bodies_that_end_cleanly_end_cleanly(
    origin: Origin, tmp_path: Path, mode: str, kind: str
) -> None:
    with ostp_server(tmp_path) as server:
        config = tunnel_config(server.outbound())
        if kind == "direct":
            config["routing"]["default_outbound"] = "direct"
        async with running_daemon(config) as daemon:
            await wait_for(lambda: _ostp(daemon).state == "connected", 15)
            size = 5 * MB + 17
            out = tmp_path / "body"
            url = origin.url(f"/close-delimited/{size}")
            result = await curl([*_args(mode, proxy_port(daemon)), "-o", str(out), url])
            assert result.returncode == 0, result.stderr
            assert out.stat().st_size == size
            assert body_sha256(size) == _sha256(out)
            await wait_for(lambda: not daemon.registry.live)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# the application resets: the remote connection is reset too (direct)


async def test_an_application_reset_resets_the_remote_connection() -> None:
    endings: list[str] = []
    got_data = anyio.Event()
    ended = anyio.Event()

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.receive()
                    got_data.set()
            except anyio.EndOfStream:
                endings.append("FIN")
            except anyio.BrokenResourceError:
                endings.append("RST")
            ended.set()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, serve)
        target = Address("127.0.0.1", listener.extra(anyio.abc.SocketAttribute.local_port))
        async with running_daemon(base_config()) as daemon:
            for reset in (False, True):
                got_data, ended = anyio.Event(), anyio.Event()
                stream = await _socks_connect(proxy_port(daemon), target)
                await stream.send(b"part of an upload")
                with anyio.fail_after(10):
                    await got_data.wait()
                if reset:
                    _abort(stream)
                await stream.aclose()
                with anyio.fail_after(10):
                    await ended.wait()
        tg.cancel_scope.cancel()
    assert endings == ["FIN", "RST"]  # an orderly close stays orderly


# --------------------------------------------------------------------------------------------
# OstpStream: what ends a stream cleanly and what breaks it


def _stream() -> OstpStream:
    outbound = OstpOutbound("t", server=("127.0.0.1", 9), access_key="k")
    session = _Session(outbound, 0)  # not connected: messages to send go nowhere
    ctx = ConnContext(1, "in", "tcp", None)
    stream = OstpStream(session, 1, ctx)
    session.bind(1, stream)
    stream.on_message(ConnectOk())
    return stream


async def _receive_all(stream: OstpStream) -> bytes:
    data = b""
    with anyio.fail_after(5):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return data


async def test_ostp_stream_close_is_the_end_and_error_or_reset_is_a_break() -> None:
    clean = _stream()
    clean.on_message(Data(b"abc"))
    clean.on_message(Close())
    assert await _receive_all(clean) == b"abc"

    for breaking in (Error("connection reset by peer"), "reset"):
        broken = _stream()
        broken.on_message(Data(b"abc"))
        if isinstance(breaking, Error):
            broken.on_message(breaking)  # an Error after ConnectOk is no orderly end
        else:
            broken.reset("tunnel session ended: idle timeout")
        assert await broken.receive() == b"abc"  # what arrived before still arrives
        with pytest.raises(anyio.BrokenResourceError):
            await broken.receive()


async def test_ostp_stream_local_eof_ends_a_waiting_receive() -> None:
    stream = _stream()
    result: list[str] = []

    async def download() -> None:
        try:
            await stream.receive()
        except anyio.EndOfStream:
            result.append("eof")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(download)
            await anyio.wait_all_tasks_blocked()  # the download waits for data
            await stream.send_eof()  # relay Close: no data can follow (spec §8)
    assert result == ["eof"]
