"""Transport ``auto`` on a path where UDP stops and starts passing (network namespaces).

The server (``ostp-server run``) and an origin run in the server namespace, the daemon
(``ostp-client run``, transport ``auto``) in the client namespace, curl beside it through its
local proxy. An nftables rule in the server namespace silently drops UDP to the server's port:

1. the daemon starts while UDP is dropped: its UDP handshake gets no answer, the session runs
   over TCP, a download completes byte for byte and ``ctl status`` says ``tcp``;
2. the rule is deleted: a background UDP probe completes and the same OSTP session moves back
   to UDP (status ``udp``, same session, no reconnect), and a download completes;
3. the rule comes back in the middle of a download: the session notices UDP went silent, moves
   to TCP without dropping the transfer, and the body arrives whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.origin_server import body_sha256

from .tun_netns import SERVER_V4, Namespaces, need_root_and_tools

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

MB = 1024 * 1024
SERVER_PORT = 45000
PROXY_PORT = 1080
RUN_SERVER = "import sys; from ostp_server.cli import main; sys.exit(main(sys.argv[1:]))"
RUN_CLIENT = "import sys; from ostp_client.cli import main; sys.exit(main(sys.argv[1:]))"


class Setup:
    def __init__(self, ns: Namespaces, tmp: Path, origin_port: int) -> None:
        self.ns = ns
        self.tmp = tmp
        self.origin_port = origin_port
        self.control = tmp / "control.sock"
        self.daemon_log = tmp / "daemon.log"
        self.server_log = tmp / "server.log"

    def status(self) -> dict[str, Any]:
        ctl = [sys.executable, "-c", RUN_CLIENT, "ctl", "--socket", str(self.control)]
        done = subprocess.run(
            [*ctl, "--json", "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def session(self) -> dict[str, Any]:
        outbound = next(o for o in self.status()["outbounds"] if o["id"] == "proxy")
        assert outbound["transport"] == "auto"
        return dict(outbound["sessions"][0])

    def wait_session(self, predicate: Callable[[dict[str, Any]], bool], limit: float) -> None:
        deadline = time.monotonic() + limit
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.session()
            if predicate(last):
                return
            time.sleep(0.2)  # polling the daemon's status, not waiting for time to pass
        raise AssertionError(f"no such session status in {limit} s: {last}\n{self.logs()}")

    def logs(self) -> str:
        return (
            f"--- daemon\n{self.daemon_log.read_text()[-4000:]}\n"
            f"--- server\n{self.server_log.read_text()[-3000:]}"
        )

    def curl(self, size: int, out: Path, *extra: str) -> subprocess.Popen[str]:
        return self.ns.popen(
            self.ns.client,
            [
                "curl", "-sS", "--noproxy", "", "--max-time", "120",
                "-x", f"socks5h://127.0.0.1:{PROXY_PORT}", *extra,
                "-o", str(out), f"http://127.0.0.1:{self.origin_port}/bytes/{size}",
            ],
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def download(self, size: int, out: Path, *extra: str) -> None:
        check_download(self.curl(size, out, *extra), size, out, self)


def check_download(proc: subprocess.Popen[str], size: int, out: Path, setup: Setup) -> None:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"curl: {err}\n{setup.logs()}"
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
        assert handle.tell() == size
    assert digest.hexdigest() == body_sha256(size)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    need_root_and_tools("nft", "curl")
    ns = Namespaces()
    key = secrets.token_hex(16)
    try:
        ns.setup()
        origin_port = ns.start_origin()
        running = Setup(ns, tmp_path, origin_port)
        server_cfg = tmp_path / "server.json"
        server_cfg.write_text(
            json.dumps(
                {
                    "listen": f"{SERVER_V4}:{SERVER_PORT}",
                    "access_keys": [key],
                    "tcp_rate_limit": 0,
                    "replay_cache": str(tmp_path / "replay"),
                }
            )
        )
        with running.server_log.open("w") as log:
            ns.popen(
                ns.server,
                [sys.executable, "-c", RUN_SERVER, "run", "-c", str(server_cfg)],
                stderr=log,
            )
        _wait_for_text(running.server_log, "listening on tcp", 30)
        ns.drop_udp_to_server(SERVER_PORT)  # before the daemon starts: phase 1
        client_cfg = tmp_path / "client.json"
        client_cfg.write_text(
            json.dumps(
                {
                    "log": {"level": "info"},
                    "inbounds": [
                        {"type": "local_proxy", "tag": "in", "listen": "127.0.0.1"}
                        | {"port": PROXY_PORT}
                    ],
                    "outbounds": [
                        {
                            "type": "ostp",
                            "tag": "proxy",
                            "server": f"{SERVER_V4}:{SERVER_PORT}",
                            "access_key": key,
                            "transport": "auto",
                            "auto_udp_timeout": 1.5,
                            "auto_probe_interval": 2,
                            "keepalive_interval": 1,
                            "reconnect_delay": 0.5,
                        }
                    ],
                    "routing": {"default_outbound": "proxy"},
                    "control": {"socket": str(running.control)},
                }
            )
        )
        with running.daemon_log.open("w") as log:
            ns.popen(
                ns.client,
                [sys.executable, "-c", RUN_CLIENT, "run", "-c", str(client_cfg)],
                stderr=log,
                stdout=log,
            )
        _wait_for_path(running.control, 30)
        yield running
    finally:
        ns.teardown()


def _wait_for_text(path: Path, text: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.05)


def _wait_for_path(path: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_auto_uses_tcp_while_udp_is_dropped_and_moves_between_them(
    setup: Setup, tmp_path: Path
) -> None:
    ns = setup.ns
    # 1. UDP dropped from the start: the session runs over TCP
    setup.wait_session(lambda s: s["state"] == "connected", 60)
    session = setup.session()
    assert session["transport"] == "tcp", setup.logs()
    assert session["datagram_size"] == 65535 - 48  # over TCP: the ceiling, no discovery
    setup.download(20 * MB, tmp_path / "one")
    assert setup.session()["transport"] == "tcp"
    assert ns.udp_dropped() > 0  # the UDP handshake and the probes were really sent

    # 2. UDP passes again: a probe finds it and the session moves back, without reconnecting
    before = setup.session()
    ns.pass_udp_to_server()
    setup.wait_session(lambda s: s["transport"] == "udp", 90)
    after = setup.session()
    assert after["state"] == "connected"
    assert after["reconnects"] == before["reconnects"]  # the same session, roamed
    setup.download(20 * MB, tmp_path / "two")
    assert setup.session()["transport"] == "udp"
    # on UDP path MTU discovery started over and found the veth's 1,500 bytes (less 28)
    setup.wait_session(lambda s: s["datagram_size"] == 1500 - 28, 30)

    # 3. UDP stops in the middle of a download: the transfer survives the move to TCP
    out = tmp_path / "three"
    proc = setup.curl(40 * MB, out, "--limit-rate", "4M")
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 4 * MB):
        assert proc.poll() is None, setup.logs()
        assert time.monotonic() < deadline, setup.logs()
        time.sleep(0.05)
    ns.drop_udp_to_server(SERVER_PORT)
    check_download(proc, 40 * MB, out, setup)
    final = setup.session()
    assert final["transport"] == "tcp", setup.logs()
    assert final["datagram_size"] == 65535 - 48
    assert final["reconnects"] == before["reconnects"]
    log = setup.daemon_log.read_text()
    assert "transport tcp -> udp (a UDP handshake completed)" in log
    assert "transport udp -> tcp (UDP stopped passing: no answer for" in log
    assert os.path.exists(setup.control)
