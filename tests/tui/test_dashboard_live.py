"""The dashboard against real daemons: attach, a real curl transfer in the connections table,
`c` closes it, `r` reconnects, and the dashboard survives the daemon restarting."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from ostp_client.control.client import ControlClient
from ostp_client.outbounds.block import BlockOutbound
from ostp_client.outbounds.direct import DirectOutbound
from ostp_tui.app import Dashboard
from tests.client.proxy_helpers import CURL, Origin, require_curl, run_origin
from tests.tui.live import (
    FakeSessionOutbound,
    base_config,
    control_daemon,
    daemon_process,
    short_socket_dir,
    start_daemon_process,
    stop_process,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SIZE = (140, 40)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_socket_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _proxy_port(socket: str) -> int:
    async with await ControlClient.connect(socket) as client:
        listen = (await client.status()).inbounds[0].listen[0]
    return int(listen.rsplit(":", 1)[1])


def _rows(app: Dashboard) -> list[list[Any]]:
    table = app.query_one("#connections", DataTable)
    return [table.get_row(key) for key in table.rows]


async def test_curl_transfer_shows_and_c_closes_it(sock_dir: Path, origin: Origin) -> None:
    socket = str(sock_dir / "control.sock")
    with daemon_process(base_config(socket), sock_dir) as daemon:
        app = Dashboard(socket, retry_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "● running" in app.header_text, "the running header")
            assert app.link_state == "attached"
            assert {p.tag for p in app.panels.values()} == {"direct", "block"}
            port = await _proxy_port(socket)
            curl = subprocess.Popen(  # noqa: ASYNC220 (killed in finally)
                [
                    CURL,
                    "-sS",
                    "--noproxy",
                    "",
                    "-x",
                    f"socks5h://127.0.0.1:{port}",
                    "--limit-rate",
                    "2M",
                    "-o",
                    "/dev/null",
                    origin.url("/bytes/2000000000"),
                ],
                stderr=subprocess.PIPE,
            )
            try:
                target = f"127.0.0.1:{origin.port}"
                await until(
                    pilot,
                    lambda: any(row[2] == target and row[4] == "direct" for row in _rows(app)),
                    "curl's connection in the table",
                )
                await until(
                    pilot,
                    lambda: any(c.bytes_down > 0 for c in app.conns.values()),
                    "bytes flowing",
                )
                app.query_one("#connections", DataTable).focus()
                await pilot.press("c")
                # curl first drains what the kernel buffered for it (megabytes), then sees EOF
                await until(pilot, lambda: curl.poll() is not None, "curl to end")
                assert curl.returncode != 0  # cut off mid-transfer
                await until(pilot, lambda: not _rows(app), "an empty connections table")
            finally:
                if curl.poll() is None:
                    curl.kill()
                curl.wait(timeout=10)
                if curl.stderr:
                    curl.stderr.close()
            assert daemon.poll() is None


async def test_r_reconnects_the_session_outbound(sock_dir: Path) -> None:
    fake = FakeSessionOutbound("proxy")
    outbounds = {"proxy": fake, "direct": DirectOutbound("direct"), "block": BlockOutbound("block")}
    config = base_config(str(sock_dir / "control.sock"))
    config["outbounds"].insert(0, {"type": "direct", "tag": "proxy"})
    async with control_daemon(config, outbounds) as running:
        app = Dashboard(running.path, retry_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "tunnel Connected" in app.header_text, "Connected")
            await pilot.press("r")
            await until(pilot, lambda: fake.reconnect_calls == 1, "the reconnect call")
            await until(
                pilot,
                lambda: app.status is not None and app.status.outbounds[0].reconnects == 1,
                "the reconnect count",
            )
            app.panels["direct"].focus()  # a focused panel is the target; direct has none
            await pilot.press("r")
            await pilot.pause(0.2)
            assert fake.reconnect_calls == 1
            assert app.link_state == "attached"


async def test_survives_the_daemon_restarting(sock_dir: Path) -> None:
    socket = sock_dir / "control.sock"
    config_file = sock_dir / "cfg.json"
    config_file.write_text(__import__("json").dumps(base_config(str(socket))))
    app = Dashboard(str(socket), retry_interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link_state == "offline", "the offline state")
        assert "not running" in app.header_text and str(socket) in app.header_text
        process = start_daemon_process(config_file)
        try:
            await until(pilot, lambda: "● running" in app.header_text, "attaching")
            assert app.attaches == 1
            process.send_signal(signal.SIGKILL)  # no cleanup: a stale socket file stays
            process.wait(timeout=10)
            await until(pilot, lambda: app.link_state == "offline", "noticing the drop")
            assert "not running" in app.header_text
            process = start_daemon_process(config_file)
            await until(pilot, lambda: app.attaches == 2 and app.status is not None, "re-attach")
            await until(pilot, lambda: "● running" in app.header_text, "the running header")
            stop_process(process)  # graceful this time
            await until(pilot, lambda: app.link_state == "offline", "the second drop")
            assert app.is_running and app.render_errors == 0
        finally:
            stop_process(process)


async def test_group_card_shows_members_and_g_selects_the_next(sock_dir: Path) -> None:
    config = base_config(str(sock_dir / "control.sock"))
    config["outbounds"] = [
        {"type": "direct", "tag": "one"},
        {"type": "direct", "tag": "two"},
        {"type": "selector", "tag": "sel", "outbounds": ["one", "two"]},
    ]
    config["routing"] = {"default_outbound": "sel"}
    async with control_daemon(config) as running:
        group = running.daemon.outbounds["sel"]
        app = Dashboard(running.path, retry_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "sel" in app.panels, "the group's card")
            panel = app.panels["sel"]
            await until(
                pilot,
                lambda: "using one" in str(panel.query_one("#sessions").render()),
                "the members on the card",
            )
            panel.focus()
            await pilot.press("g")
            await until(pilot, lambda: getattr(group, "selected", None) == "two", "the choice")
            await until(
                pilot,
                lambda: "using two" in str(panel.query_one("#sessions").render()),
                "the card to follow",
            )


def test_connection_row_names_the_group_and_its_member() -> None:
    from ostp_client.control.protocol import ConnectionInfo

    app = Dashboard("/nonexistent.sock")
    through = ConnectionInfo(id=1, inbound="in", outbound="auto", via=["auto", "b"])
    plain = ConnectionInfo(id=2, inbound="in", outbound="direct")
    assert app._conn_cells(through)[4] == "auto → b"
    assert app._conn_cells(plain)[4] == "direct"
