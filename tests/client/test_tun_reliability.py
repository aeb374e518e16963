"""TUN flows: what the application ends first leaves nothing behind, and a tunnel that breaks
resets the application's connection.

The daemon runs in the client namespace of `tun_netns.py` (real TUN device, real curl), with
the `ostp` outbound to a real ostp-server in the server namespace, or `direct`. Needs root and
curl: skipped with a reason outside CI, failing under CI=true.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ostp_client.control.client import ControlClient
from tests.client.leak_helpers import close_wait_sockets, fd_count
from tests.client.test_tun_e2e import KEY, Env, direct_config, tun_inbound
from tests.client.tun_netns import ORIGIN_V4, SERVER_V4, Namespaces, need_root_and_tools

pytestmark = [pytest.mark.timeout(180)]

CURL_RECV_ERROR = 56


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    need_root_and_tools("curl")
    ns = Namespaces(mtu=9000)
    try:
        ns.setup()
        port = ns.start_origin()
        yield Env(ns, port, tmp_path_factory.mktemp("tunrel"))
    finally:
        ns.teardown()


def _start_ostp_server(env: Env) -> tuple[subprocess.Popen[str], int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = env.tmp / f"server-{port}.json"
    config.write_text(json.dumps({"listen": f"{SERVER_V4}:{port}", "access_keys": [KEY]}))
    log = (env.tmp / f"server-{port}.log").open("w")
    process = env.ns.popen(
        env.ns.server,
        [sys.executable, "-m", "ostp_server.cli", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, port


def ostp_config(port: int, **outbound: Any) -> dict[str, Any]:
    return {
        "inbounds": [tun_inbound()],
        "outbounds": [
            {
                "type": "ostp",
                "tag": "proxy",
                "server": f"{SERVER_V4}:{port}",
                "access_key": KEY,
                "mtu": 1400,
                **outbound,
            }
        ],
    }


async def _ask(path: Path, method: str, **params: Any) -> Any:
    client = await ControlClient.connect(str(path))
    try:
        return await client.call(method, **params)
    finally:
        await client.aclose()


def _control(env: Env, name: str, method: str, **params: Any) -> Any:
    return anyio.run(lambda: _ask(env.tmp / f"{name}.sock", method, **params))


def _wait(predicate: Any, what: str, time_limit: float = 30) -> None:
    deadline = time.monotonic() + time_limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _connected(env: Env, name: str) -> bool:
    status = _control(env, name, "status")
    return any(o["id"] == "proxy" and o["state"] == "connected" for o in status["outbounds"])


def _live(env: Env, name: str) -> list[dict[str, Any]]:
    return list(_control(env, name, "connections")["connections"])


RESET_CLIENT = """
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection((host, port), timeout=20)
    s.sendall(b"GET /forever HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    got = 0
    while got < 256 * 1024:
        got += len(s.recv(65536))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("ok")
"""


@pytest.mark.parametrize("kind", ["ostp", "direct"])
def test_tun_flows_the_application_ends_leave_nothing(env: Env, kind: str) -> None:
    server = None
    if kind == "ostp":
        server, port = _start_ostp_server(env)
        config = ostp_config(port)
    else:
        config = direct_config()
    name = f"leak-{kind}"
    try:
        with env.daemon(config, name) as daemon:
            assert daemon.proc is not None
            pid = daemon.proc.pid  # `ip netns exec` execs the daemon: this is its pid
            if kind == "ostp":
                _wait(lambda: _connected(env, name), "the tunnel")
            baseline = fd_count(pid)
            # FIN first: curl closes once it has the Content-Length body
            for index in range(20):
                env.curl(f"http://{ORIGIN_V4}:{env.port}/bytes/{1000 + index}", "-o", "/dev/null")
            # RST mid-transfer
            out = env.ns.exec(
                env.ns.client, sys.executable, "-c", RESET_CLIENT, ORIGIN_V4, str(env.port), "5"
            )
            assert out.strip() == "ok"

            def settled() -> bool:
                return not _live(env, name) and fd_count(pid) <= baseline

            _wait(settled, "no live connections and the descriptors back to baseline")
            assert close_wait_sockets(pid) == []
            status = _control(env, name, "status")
            assert status["connections_closed"] >= 25
    finally:
        if server is not None:
            env.ns.stop(server)


@pytest.mark.parametrize("how", ["server killed", "daemon stopped"])
def test_tun_flow_reset_when_the_tunnel_breaks_mid_download(env: Env, how: str) -> None:
    server, port = _start_ostp_server(env)
    name = f"break-{how.split(maxsplit=1)[0]}"
    out = env.tmp / f"{name}.body"
    try:
        with env.daemon(ostp_config(port, idle_timeout=2, keepalive_interval=0.5), name) as daemon:
            _wait(lambda: _connected(env, name), "the tunnel")
            url = f"http://{ORIGIN_V4}:{env.port}/forever"
            command = ["curl", "-sS", "--max-time", "60", "-o", str(out), url]
            curl = env.ns.popen(
                env.ns.client, command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            _wait(lambda: out.exists() and out.stat().st_size > 1_000_000, "bytes to arrive")
            if how == "server killed":
                server.kill()  # SIGKILL: the session times out
            else:
                assert daemon.proc is not None
                env.ns.stop(daemon.proc)  # SIGTERM: shutdown with the transfer in flight
            code = curl.wait(60)
            assert curl.stderr is not None
            err = curl.stderr.read()
            assert code == CURL_RECV_ERROR, (code, err)
    finally:
        env.ns.stop(server)
