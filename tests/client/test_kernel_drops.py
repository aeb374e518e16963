"""Datagrams the kernel drops for a full socket buffer are counted and shown; a capped buffer
is named once, with the sysctl that raises the cap.

An upstream server sends unpaced (spec §16): a client that falls behind loses datagrams in its
socket buffer, invisibly unless it asks the kernel (``SO_RXQ_OVFL`` with every datagram, or the
socket's ``drops`` in ``/proc/net/udp``). Without CAP_NET_ADMIN the 32 MiB the daemon asks
for is silently capped at ``net.core.rmem_max``. The counters themselves are tested with
ostp_sockets (tests/sockets/test_buffers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from ostp_client.control.client import ControlClient
from ostp_client.ctl import _status_text
from ostp_client.outbounds.ostp import OstpOutbound
from tests.client.cli_process import isolated_env, program, stop
from tests.conftest import is_root, require
from tests.tui.live import base_config, control_daemon, short_socket_dir

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.requires(sys.platform == "linux", "kernel drop counters are Linux's"),
]

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SMALL = 64 * 1024


@pytest.mark.anyio
async def test_status_shows_the_kernel_drops_of_a_flooded_session() -> None:
    """The session's socket (64 KiB) is flooded from the server's address while the daemon's
    event loop is busy: the kernel drops most of it, and `ctl status` says how many."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    sock_dir = short_socket_dir()
    outbound = {
        "type": "ostp",
        "tag": "proxy",
        "server": f"127.0.0.1:{server.getsockname()[1]}",
        "access_key": KEY,
        "socket_buffer": SMALL,
    }
    config = base_config(str(sock_dir / "c.sock"))
    config["outbounds"].append(outbound)
    try:
        with server:
            async with control_daemon(config) as running:
                with anyio.fail_after(10):
                    await anyio.wait_readable(server)
                _, client_address = server.recvfrom(65535)  # the handshake's source
                payload = os.urandom(1200)
                for _ in range(3000):  # no await: the daemon cannot read meanwhile
                    server.sendto(payload, client_address)
                client = await ControlClient.connect(running.path)
                try:
                    with anyio.fail_after(20):
                        while True:
                            status = await client.status()
                            [proxy] = [o for o in status.outbounds if o.id == "proxy"]
                            if proxy.kernel_drops:
                                break
                            await anyio.sleep(0.05)
                finally:
                    await client.aclose()
                session = proxy.sessions[0]
                assert session.kernel_drops is not None and session.kernel_drops > 1000
                assert proxy.kernel_drops == session.kernel_drops
                assert session.socket_buffer == SMALL
                text = _status_text(status)
                assert "KDROPS" in text and "SOCKBUF" in text and "64.0 KiB" in text
                outbound_obj = running.daemon.outbounds["proxy"]
                assert isinstance(outbound_obj, OstpOutbound)
                assert outbound_obj.sessions[0].kernel_drops() == session.kernel_drops
    finally:
        for leftover in sock_dir.iterdir():
            leftover.unlink()
        sock_dir.rmdir()


def _rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def test_a_capped_buffer_is_named_once_with_the_sysctl(tmp_path: Path) -> None:
    """Two sessions, each reconnecting several times, all capped: one warning."""
    asked = max(32 * 1024 * 1024, 2 * _rmem_max())
    require(asked <= 1024 * 1024 * 1024, "net.core.rmem_max is too large to ask for more")
    if is_root():
        # root may force any size; without CAP_NET_ADMIN it is capped like any user
        setpriv = shutil.which("setpriv")
        require(setpriv is not None, "needs setpriv (util-linux)")
        assert setpriv is not None
        prefix = [setpriv, "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    else:
        prefix = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # never answers
        silent.bind(("127.0.0.1", 0))
        config: dict[str, Any] = {
            "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
            "outbounds": [
                {
                    "type": "ostp",
                    "tag": "proxy",
                    "server": f"127.0.0.1:{silent.getsockname()[1]}",
                    "access_key": KEY,
                    "socket_buffer": asked,
                    "reconnect_delay": 0,
                    "mux": {"enabled": True, "sessions": 2},
                }
            ],
            "routing": {"default_outbound": "proxy"},
        }
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        env = isolated_env(tmp_path / "home", PYTHONUNBUFFERED="1")
        log = tmp_path / "daemon.log"
        with log.open("w") as err:
            process = subprocess.Popen(
                [*prefix, *program(), "run", "-c", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        try:
            deadline = time.monotonic() + 60
            # each attempt is 4 handshakes 1.2 s apart; wait for a few new sockets per session
            while log.read_text().count("reconnecting in") < 4:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            stop(process)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "capped the UDP socket buffers" in line]
    assert len(warnings) == 1, text
    assert f"sysctl -w net.core.rmem_max={asked} net.core.wmem_max={asked}" in warnings[0]
