"""Reload against a real daemon: real curl, a real origin, real ostp-server processes.

What a reload may change while connections run (outbounds, inbounds, routing), what it must
leave alone (unchanged outbounds keep their sessions and streams), and what it refuses
(invalid configs, ports in use) without changing anything. SIGHUP does what `ctl reload` does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_client.control.client import ControlClient, ControlError
from ostp_client.control.protocol import ReloadResult
from ostp_client.daemon import Daemon
from ostp_client.flow import Address
from ostp_client.inbounds.proxy.socks5 import encode_address
from ostp_client.outbounds.ostp import OstpOutbound
from tests.client.origin_server import body_bytes, body_sha256
from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    wait_for,
)
from tests.client.tun_netns import ORIGIN_V4, SERVER_V4, Namespaces, need_root_and_tools
from tests.client.tunnel_helpers import ServerProcess, ostp_server
from tests.tui.live import control_daemon, program, short_socket_dir, start_daemon_process
from tests.tui.live import stop_process as stop_daemon_process

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MB = 1024 * 1024


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = short_socket_dir()  # the control socket's path must stay short
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _config(workdir: Path, *outbounds: dict[str, Any], **routing: Any) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            *outbounds,
            {"type": "direct", "tag": "direct"},
            {"type": "block", "tag": "block"},
        ],
        "routing": {"rules": routing.get("rules", []), "default_outbound": outbounds[0]["tag"]}
        if outbounds
        else {"rules": routing.get("rules", []), "default_outbound": "direct"},
        "control": {"socket": str(workdir / "control.sock")},
    }


class Reloader:
    """A daemon in this event loop, its config file and a control client."""

    def __init__(self, daemon: Daemon, client: ControlClient, path: Path) -> None:
        self.daemon = daemon
        self.client = client
        self.path = path

    async def apply(self, config: dict[str, Any]) -> ReloadResult:
        self.path.write_text(json.dumps(config))
        return await self.client.reload()

    async def refused(self, text: str) -> ControlError:
        self.path.write_text(text)
        with pytest.raises(ControlError) as refused:
            await self.client.reload()
        assert refused.value.code == "invalid_config"
        return refused.value


@asynccontextmanager
async def reloadable(config: dict[str, Any], workdir: Path) -> AsyncIterator[Reloader]:
    path = workdir / "cfg.json"
    path.write_text(json.dumps(config))
    async with (
        control_daemon(config, config_path=str(path)) as running,
        await ControlClient.connect(running.path) as client,
    ):
        yield Reloader(running.daemon, client, path)


async def _whoami(port: int, origin: Origin) -> str:
    """The address the origin saw the request come from."""
    result = await curl([*proxy_args("socks5", port), origin.url("/whoami")])
    assert result.returncode == 0, result.stderr
    client: str = json.loads(result.stdout)["client"]
    return client


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _refuses(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def _socks_connect(port: int, origin_port: int) -> anyio.abc.SocketStream:
    """A SOCKS5 CONNECT to the origin, without authentication (RFC 1928)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    target = Address("127.0.0.1", origin_port)
    await stream.send(b"\x05\x01\x00\x05\x01\x00" + encode_address(target))
    reply = b""
    with anyio.fail_after(10):
        while len(reply) < 12:
            reply += await stream.receive()
    assert reply[:4] == b"\x05\x00\x05\x00"
    return stream


async def _slow_download(port: int, origin: Origin, size: int, out: Path, rate: str) -> int:
    """curl through the proxy at a limited rate; returns curl's exit code."""
    args = [*proxy_args("socks5", port), "--limit-rate", rate, "-o", str(out)]
    result = await curl([*args, origin.url(f"/bytes/{size}")], time_limit=50)
    return result.returncode


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _transfer_running(daemon: Daemon, outbound: str, at_least: int = MB) -> None:
    def running() -> bool:
        return any(
            c.outbound_tag == outbound and c.bytes_down >= at_least
            for c in daemon.registry.live.values()
        )

    await wait_for(running, 20)


# --------------------------------------------------------------------------------------------
# routing and outbounds


async def test_new_rule_and_outbound_take_new_connections(origin: Origin, workdir: Path) -> None:
    config = _config(workdir)
    async with reloadable(config, workdir) as r:
        daemon = r.daemon
        port = proxy_port(daemon)
        inbound, direct = daemon.inbounds["proxy-in"], daemon.outbounds["direct"]
        assert await _whoami(port, origin) == "127.0.0.1"

        result = await r.apply(config)
        assert (result.applied, result.needs_restart) == ([], [])

        new = copy.deepcopy(config)
        new["outbounds"].append({"type": "direct", "tag": "via3", "bind_address": "127.0.0.3"})
        new["routing"]["rules"].append({"port": [origin.port], "outbound": "via3"})
        result = await r.apply(new)
        assert result.applied == ["routing", "outbounds"]
        assert "outbound via3 added" in result.message
        assert await _whoami(port, origin) == "127.0.0.3"  # the new rule, the new outbound
        assert daemon.inbounds["proxy-in"] is inbound and daemon.outbounds["direct"] is direct
        assert daemon.dispatcher.outbounds is daemon.outbounds
        status = await r.client.status()
        assert [o.id for o in status.outbounds] == ["direct", "block", "via3"]
        assert (await r.client.routes()).rules[0].hits == 1

        moved = copy.deepcopy(new)
        moved["control"] = {"socket": str(workdir / "elsewhere.sock")}
        result = await r.apply(moved)
        assert (result.applied, result.needs_restart) == ([], ["control"])
        assert "control socket moves at the next restart" in result.message
        assert (await r.client.status()).state == "running"  # still on the old socket
        assert not (workdir / "elsewhere.sock").exists()

        result = await r.apply(config)  # and back: via3 removed, the rule gone
        assert result.applied == ["routing", "outbounds"]
        assert "via3" not in daemon.outbounds
        assert await _whoami(port, origin) == "127.0.0.1"


async def test_replaced_outbound_serves_out_its_connections(
    origin: Origin, workdir: Path, tmp_path: Path
) -> None:
    config = _config(workdir, {"type": "direct", "tag": "out", "bind_address": "127.0.0.2"})
    async with reloadable(config, workdir) as r:
        daemon = r.daemon
        port = proxy_port(daemon)
        old = daemon.outbounds["out"]
        size = 48 * MB  # more than the sockets buffer on the way
        rate = "12M"
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def download() -> None:
                codes.append(await _slow_download(port, origin, size, tmp_path / "a", rate))

            tg.start_soon(download)
            await _transfer_running(daemon, "out")
            new = copy.deepcopy(config)
            new["outbounds"][0]["bind_address"] = "127.0.0.4"
            result = await r.apply(new)
            assert result.applied == ["outbounds"]
            assert "outbound out replaced (1 connection(s) stay" in result.message
            assert daemon.outbounds["out"] is not old
            assert await _whoami(port, origin) == "127.0.0.4"  # new connections: the new one
        assert codes == [0]  # the old one finished its transfer within the grace period
        assert _sha256(tmp_path / "a") == body_sha256(size)

        # With a short grace period, a transfer that outlives it is closed. Slow enough that it
        # outlives the reload itself on a loaded machine too (48 MB at 2 MB/s: 24 s).
        daemon.reload_grace = 0.5
        rate = "2M"
        # curl is done, but the daemon may still hold its connection (the origin keeps it
        # alive): wait until it is gone, or it would pass for the new transfer below.
        await wait_for(lambda: not daemon.registry.live, 20)
        async with anyio.create_task_group() as tg:
            codes.clear()
            tg.start_soon(download)
            await _transfer_running(daemon, "out")
            await r.apply(config)
        assert codes[0] != 0
        assert (tmp_path / "a").stat().st_size < size
        assert await _whoami(port, origin) == "127.0.0.2"


async def test_removed_outbound_closes_its_connections(
    origin: Origin, workdir: Path, tmp_path: Path
) -> None:
    rules = [{"port": [origin.port], "outbound": "slow"}]
    config = _config(workdir, {"type": "direct", "tag": "slow"}, rules=rules)
    async with reloadable(config, workdir) as r:
        port = proxy_port(r.daemon)
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def download() -> None:
                codes.append(await _slow_download(port, origin, 48 * MB, tmp_path / "a", "12M"))

            tg.start_soon(download)
            await _transfer_running(r.daemon, "slow")
            result = await r.apply(_config(workdir))
            assert "outbound slow removed (1 connection(s) closed)" in result.message
        assert codes[0] != 0
        assert r.daemon.registry.live == {}
        assert await _whoami(port, origin) == "127.0.0.1"


# --------------------------------------------------------------------------------------------
# inbounds


async def test_new_port_listens_and_the_old_one_refuses(origin: Origin, workdir: Path) -> None:
    config = _config(workdir)
    async with reloadable(config, workdir) as r:
        old_port = proxy_port(r.daemon)
        new_port = _free_tcp_port()
        new = copy.deepcopy(config)
        new["inbounds"][0]["port"] = new_port
        result = await r.apply(new)
        assert result.applied == ["inbounds"]
        assert "inbound proxy-in restarted" in result.message
        assert proxy_port(r.daemon) == new_port
        assert await _whoami(new_port, origin) == "127.0.0.1"
        assert await _refuses(old_port)
        status = await r.client.status()
        assert status.inbounds[0].listen == [f"127.0.0.1:{new_port}"]


async def test_same_port_settings_apply_in_place(origin: Origin, workdir: Path) -> None:
    config = _config(workdir)
    async with reloadable(config, workdir) as r:
        inbound = r.daemon.inbounds["proxy-in"]
        port = proxy_port(r.daemon)
        # a connection that is open during the change
        stream = await _socks_connect(port, origin.port)
        new = copy.deepcopy(config)
        new["inbounds"][0]["users"] = [{"username": "u", "password": "p"}]
        result = await r.apply(new)
        assert "inbound proxy-in updated" in result.message
        assert r.daemon.inbounds["proxy-in"] is inbound and proxy_port(r.daemon) == port
        without = await curl([*proxy_args("socks5", port), origin.url("/whoami")])
        assert without.returncode != 0  # now authentication is required
        with_user = await curl([*proxy_args("socks5", port, "u:p"), origin.url("/whoami")])
        assert with_user.returncode == 0, with_user.stderr
        # the connection opened before is still served
        await stream.send(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        with anyio.fail_after(10):
            while not received.endswith(body_bytes(1000)):
                received += await stream.receive()
        await stream.aclose()


# --------------------------------------------------------------------------------------------
# refused configs


async def test_invalid_configs_are_refused_and_nothing_changes(
    origin: Origin, workdir: Path
) -> None:
    config = _config(workdir)
    async with reloadable(config, workdir) as r:
        daemon = r.daemon
        port = proxy_port(daemon)
        before = (dict(daemon.outbounds), dict(daemon.inbounds), daemon.router, daemon.config)

        assert "not valid JSON" in (await r.refused("{ not json")).message
        unknown = copy.deepcopy(config)
        unknown["routing"]["rules"].append({"domain": ["x.test"], "outbound": "nowhere"})
        assert "nowhere" in (await r.refused(json.dumps(unknown))).message

        with socket.socket() as busy:  # a port someone else holds
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            bad = copy.deepcopy(config)
            bad["outbounds"].append({"type": "direct", "tag": "extra"})
            bad["inbounds"][0]["port"] = taken
            error = await r.refused(json.dumps(bad))
            assert "the running configuration stays" in error.message
            tag = bad["inbounds"][0]["tag"]
            assert (
                f'inbound "{tag}" cannot listen on 127.0.0.1:{taken}: address already in use'
                in (error.message)
            )

            # A renamed inbound keeps its port (the old listener makes room first); a second
            # one cannot bind: the old listener comes back on its port.
            renamed = copy.deepcopy(config)
            renamed["inbounds"] = [
                {"type": "local_proxy", "tag": "renamed", "port": port},
                {"type": "local_proxy", "tag": "second", "port": taken},
            ]
            await r.refused(json.dumps(renamed))
            assert proxy_port(daemon) == port

        assert "extra" not in daemon.outbounds
        assert daemon.router is before[2] and daemon.config is before[3]
        assert daemon.outbounds == before[0]
        assert list(daemon.inbounds) == ["proxy-in"]
        assert await _whoami(port, origin) == "127.0.0.1"
        assert len(daemon._tasks) == 3  # direct, block, proxy-in: nothing left running

        renamed = copy.deepcopy(config)
        renamed["inbounds"] = [{"type": "local_proxy", "tag": "renamed", "port": port}]
        result = await r.apply(renamed)
        assert "inbound proxy-in removed" in result.message
        assert "inbound renamed added" in result.message
        assert proxy_port(daemon, "renamed") == port
        assert await _whoami(port, origin) == "127.0.0.1"


# --------------------------------------------------------------------------------------------
# ostp outbounds


def _ostp(daemon: Daemon, tag: str = "proxy") -> OstpOutbound:
    outbound = daemon.outbounds[tag]
    assert isinstance(outbound, OstpOutbound)
    return outbound


def _session_ids(outbound: OstpOutbound) -> list[int | None]:
    return [s.session_id for s in outbound.status().sessions]


@pytest.fixture
def root_level() -> Iterator[None]:
    """A reload sets the root logger's level: put it back after the test."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ostp_server(tmp_path) as running:
        yield running


@pytest.mark.timeout(120)
async def test_unchanged_ostp_outbound_keeps_session_and_streams(
    origin: Origin, server: ServerProcess, workdir: Path, tmp_path: Path, root_level: None
) -> None:
    config = _config(workdir, server.outbound())
    async with reloadable(config, workdir) as r:
        daemon = r.daemon
        ostp = _ostp(daemon)
        await wait_for(lambda: ostp.state == "connected", 15)
        sessions = _session_ids(ostp)
        assert None not in sessions
        port = proxy_port(daemon)
        size = 24 * MB
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def download() -> None:
                codes.append(await _slow_download(port, origin, size, tmp_path / "a", "6M"))

            tg.start_soon(download)
            await _transfer_running(daemon, "proxy")
            new = copy.deepcopy(config)
            new["outbounds"].append({"type": "direct", "tag": "via3", "bind_address": "127.0.0.3"})
            new["routing"]["rules"].append({"domain": ["localhost"], "outbound": "via3"})
            new["log"] = {"level": "debug"}
            new["inbounds"].append({"type": "local_proxy", "tag": "second", "port": 0})
            result = await r.apply(new)
            assert result.applied == ["routing", "log.level", "outbounds", "inbounds"]
            assert daemon.outbounds["proxy"] is ostp
            assert any(c.outbound_tag == "proxy" for c in daemon.registry.live.values())
        assert codes == [0]
        assert _sha256(tmp_path / "a") == body_sha256(size)
        assert _session_ids(ostp) == sessions
        assert ostp.status().reconnects == 0


@pytest.mark.timeout(120)
async def test_changed_ostp_server_moves_new_connections(
    origin: Origin, server: ServerProcess, workdir: Path, tmp_path: Path
) -> None:
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    config = _config(workdir, server.outbound())
    async with reloadable(config, workdir) as r:
        daemon = r.daemon
        old = _ostp(daemon)
        await wait_for(lambda: old.state == "connected", 15)
        port = proxy_port(daemon)
        with ostp_server(second_dir) as second:
            size = 12 * MB
            async with anyio.create_task_group() as tg:
                codes: list[int] = []

                async def download() -> None:
                    codes.append(await _slow_download(port, origin, size, tmp_path / "a", "4M"))

                tg.start_soon(download)
                await _transfer_running(daemon, "proxy")
                new = copy.deepcopy(config)
                new["outbounds"][0] = second.outbound()
                result = await r.apply(new)
                assert result.applied == ["outbounds"]
                assert "outbound proxy replaced (1 connection(s) stay" in result.message
                replacement = _ostp(daemon)
                assert replacement is not old
                assert replacement.server == ("127.0.0.1", second.port)
                await wait_for(lambda: replacement.state == "connected", 15)
                assert await _whoami(port, origin) == "127.0.0.1"
                assert replacement.status().bytes_down > 0  # that one went the new way
            assert codes == [0]  # the old session carried its transfer to the end
            assert _sha256(tmp_path / "a") == body_sha256(size)
            # Once its connections ended, the old pool was stopped: its sockets are closed.
            await wait_for(lambda: all(s.sock is None for s in old.sessions), 10)
            server.stop()  # the first server is no longer needed
            assert await _whoami(port, origin) == "127.0.0.1"
            assert _ostp(daemon).status().server == f"127.0.0.1:{second.port}"

            # A changed top-level mux replaces the ostp outbound that uses it.
            more = copy.deepcopy(new)
            more["mux"] = {"enabled": True, "sessions": 2}
            result = await r.apply(more)
            assert result.applied == ["outbounds", "mux"]
            assert len(_ostp(daemon).sessions) == 2


# --------------------------------------------------------------------------------------------
# SIGHUP


def _ctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program(), "ctl", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _status(socket_path: Path) -> dict[str, Any] | None:
    done = _ctl(socket_path, "--json", "status")
    if done.returncode != 0:
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_sighup_reloads_like_ctl_reload(origin: Origin, workdir: Path) -> None:
    config = _config(workdir)
    config["log"] = {"level": "info"}
    sock = workdir / "control.sock"
    path = workdir / "cfg.json"
    path.write_text(json.dumps(config))
    process = start_daemon_process(path)
    try:
        status = None
        with anyio.fail_after(20):
            while status is None or status["state"] != "running":  # listening from then on
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                await anyio.sleep(0.1)
                status = await anyio.to_thread.run_sync(_status, sock)
        port = int(status["inbounds"][0]["listen"][0].rsplit(":", 1)[1])
        assert await _whoami(port, origin) == "127.0.0.1"

        new = copy.deepcopy(config)
        new["outbounds"].append({"type": "direct", "tag": "via3", "bind_address": "127.0.0.3"})
        new["routing"]["rules"].append({"port": [origin.port], "outbound": "via3"})
        path.write_text(json.dumps(new))
        process.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: "via3" in [o["id"] for o in (_status(sock) or {}).get("outbounds", [])], 20
        )
        assert await _whoami(port, origin) == "127.0.0.3"

        path.write_text("{ not json")
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload refused" in _ctl(sock, "logs").stdout, 20)
        assert process.poll() is None
        assert await _whoami(port, origin) == "127.0.0.3"

        path.write_text(json.dumps(config))  # the same through `ctl reload`
        done = await anyio.to_thread.run_sync(_ctl, sock, "reload")
        assert done.returncode == 0, done.stderr
        assert await _whoami(port, origin) == "127.0.0.1"
    finally:
        stop_daemon_process(process)
    assert process.returncode == 0


# --------------------------------------------------------------------------------------------
# TUN (root: a network namespace with a real TUN device, see tun_netns.py)


def _wait_text(path: Path, text: str, count: int = 1, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, path.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_tun_restarts_only_when_its_config_changed(workdir: Path, tmp_path: Path) -> None:
    need_root_and_tools("curl")
    tun = "ostp0"
    ns = Namespaces(mtu=9000)
    daemon: subprocess.Popen[str] | None = None
    log = tmp_path / "daemon.log"
    try:
        ns.setup()
        origin_port = ns.start_origin()
        config: dict[str, Any] = {
            "inbounds": [{"type": "tun", "tag": "tun-in", "name": tun, "mtu": 9000}],
            "outbounds": [{"type": "direct", "tag": "direct", "override_address": SERVER_V4}],
            "log": {"level": "info"},
            "control": {"socket": str(workdir / "tun.sock")},
        }
        path = workdir / "tun.json"
        path.write_text(json.dumps(config))
        daemon = ns.start_daemon(path, tun, log)
        size = 48 * MB
        out = tmp_path / "a.bin"
        url = f"http://{ORIGIN_V4}:{origin_port}/bytes/{size}"
        download = ns.popen(
            ns.client,
            ["curl", "-sS", "--max-time", "50", "--limit-rate", "12M", "-o", str(out), url],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not out.exists() or out.stat().st_size < MB:
            assert time.monotonic() < deadline and download.poll() is None
            time.sleep(0.05)

        # Something else changes: the TUN and its connection stay.
        new = copy.deepcopy(config)
        new["outbounds"].append({"type": "block", "tag": "block"})
        new["routing"] = {"rules": [{"domain": ["blocked.test"], "outbound": "block"}]}
        path.write_text(json.dumps(new))
        daemon.send_signal(signal.SIGHUP)
        _wait_text(log, "reloaded ")
        assert download.poll() is None  # still running after the reload
        assert download.wait(60) == 0, download.stderr.read() if download.stderr else ""
        assert _sha256(out) == body_sha256(size)
        assert log.read_text().count("inbound tun-in: TUN") == 1  # opened once, at start

        # The TUN's own config changes: it restarts (its connections are dropped).
        new["inbounds"][0]["mtu"] = 1500
        path.write_text(json.dumps(new))
        daemon.send_signal(signal.SIGHUP)
        _wait_text(log, "reloaded ", 2)
        assert "inbound tun-in restarted" in log.read_text()
        assert log.read_text().count("inbound tun-in: TUN") == 2
        assert "mtu 1500" in ns.ip(ns.client, "link", "show", tun)
        small = tmp_path / "b.bin"
        again = f"http://{ORIGIN_V4}:{origin_port}/bytes/1000"
        ns.exec(ns.client, "curl", "-sS", "--max-time", "20", "-o", str(small), again)
        assert _sha256(small) == body_sha256(1000)
    finally:
        code = ns.stop(daemon) if daemon is not None else 0
        ns.teardown()
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


async def test_metrics_and_log_output_changes_wait_for_a_restart(workdir: Path) -> None:
    config = _config(workdir)
    async with reloadable(config, workdir) as r:
        changed = copy.deepcopy(config)
        changed["metrics"] = {"listen": "127.0.0.1:9"}
        changed["log"] = {"level": "debug", "format": "json"}
        result = await r.apply(changed)
        assert result.applied == ["log.level"]
        assert sorted(result.needs_restart) == ["log", "metrics"]
        assert logging.getLogger().level == logging.DEBUG
        # the running config keeps what still runs: the same change is reported again
        again = await r.apply(changed)
        assert sorted(again.needs_restart) == ["log", "metrics"]
        assert again.applied == []
