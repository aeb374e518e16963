"""Real daemons for the control-socket and dashboard tests: in process or as `ostp-client run`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ostp_client.config import config_from_data
from ostp_client.control.client import ControlClient, ControlConnectionError
from ostp_client.control.server import ControlServer
from ostp_client.daemon import Daemon
from ostp_client.flow import Outbound
from ostp_client.outbounds.direct import DirectOutbound
from ostp_client.outbounds.ostp import OstpReport, SessionState, SessionStatus


class FakeSessionOutbound(DirectOutbound):
    """A `direct` outbound that reports ostp-like sessions and records `reconnect()` calls."""

    type = "ostp"

    def __init__(self, tag: str = "proxy") -> None:
        super().__init__(tag)
        self.reconnect_calls = 0
        self.state = "connecting"
        self.bytes_down = 0

    async def reconnect(self) -> None:
        self.reconnect_calls += 1
        self.state = "connecting"

    def status(self) -> OstpReport:
        self.bytes_down += 1000
        state, self.state = self.state, "connected"  # connected from the next look on
        session = SessionStatus(
            index=0,
            state=SessionState(state),
            session_id=7,
            rtt_ms=12.5,
            bytes_up=10,
            bytes_down=self.bytes_down,
            connected_since=1.0,
            reconnects=self.reconnect_calls,
            replacements=0,
            streams=0,
            flow_control=True,
            datagram_size=1400,
            pmtud=None,
            receive_buffered=0,
            receive_paused=False,
            kernel_drops=None,
            socket_buffer=None,
            last_error=None,
            path="direct",
            mapped_address="198.51.100.7:40000",
            relayed_address=None,
            turn_refreshes=0,
            nat_drops=None,
            transport="udp",
            transport_switches=0,
        )
        return OstpReport(
            tag=self.tag,
            type=self.type,
            state=state,
            server="192.0.2.1:8443",
            rtt_ms=12.5,
            bytes_up=10,
            bytes_down=self.bytes_down,
            reconnects=self.reconnect_calls,
            mapped_address="198.51.100.7:40000",
            sessions=(session,),
        )


def short_socket_dir() -> Path:
    """Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be too long."""
    return Path(tempfile.mkdtemp(prefix="ostp-ctl-", dir="/tmp"))


def base_config(socket: str, **extra: Any) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [{"type": "direct", "tag": "direct"}, {"type": "block", "tag": "block"}],
        "routing": {
            "rules": [{"domain_suffix": ["blocked.test"], "outbound": "block"}],
            "default_outbound": "direct",
        },
        "control": {"socket": socket},
        **extra,
    }


@dataclass
class Running:
    daemon: Daemon
    server: ControlServer
    path: str


@asynccontextmanager
async def control_daemon(
    config: Mapping[str, Any],
    outbounds: Mapping[str, Outbound] | None = None,
    config_path: str | None = None,
) -> AsyncIterator[Running]:
    """A Daemon and its ControlServer in this event loop."""
    parsed, _ = config_from_data(dict(config))
    daemon = Daemon(parsed, outbounds=outbounds)
    server = ControlServer(daemon, config_path=config_path)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        await tg.start(daemon.run)
        try:
            yield Running(daemon, server, server.path)
        finally:
            # Cancelling a Unix-socket read races with the peer's close in anyio (a reader
            # callback sets a cancelled future: agronholm/anyio#1267), and anyio's test runner
            # fails on that logged error: let clients leave first.
            with anyio.move_on_after(5):
                while server.clients:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            daemon.stop()
            tg.cancel_scope.cancel()


async def wait_for_socket(path: str, time_limit: float = 20) -> None:
    with anyio.fail_after(time_limit):
        while True:
            try:
                client = await ControlClient.connect(path)
            except ControlConnectionError:
                await anyio.sleep(0.05)
                continue
            await client.aclose()
            return


def program() -> list[str]:
    exe = shutil.which("ostp-client")
    return [exe] if exe else [sys.executable, "-m", "ostp_client.cli"]


@contextmanager
def daemon_process(config: Mapping[str, Any], directory: Path) -> Iterator[subprocess.Popen[str]]:
    """`ostp-client run -c cfg.json` as a real process; SIGTERM (then SIGKILL) at exit."""
    path = directory / "cfg.json"
    path.write_text(json.dumps(config))
    process = start_daemon_process(path)
    try:
        yield process
    finally:
        stop_process(process)


def start_daemon_process(config_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*program(), "run", "-c", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop_process(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    with suppress(Exception):
        if process.stderr is not None:
            process.stderr.close()
