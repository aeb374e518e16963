"""Path MTU discovery end to end: the real daemon and the real ostp-server behind a veth of
MTU 1500 whose both ends drop IP fragments (``Namespaces.drop_fragments()``).

Before DPLPMTUD every transfer over such a path failed (the server sent ~4.2 KB datagrams, IP
fragmented them, the fragments died). Now both sides start at 1,232 bytes and probe with DF set
up to what the first hop carries (1,472 bytes of UDP payload over IPv4), so 100 MB go through
byte-exact and not one fragment is ever sent. Needs root, nft and curl: skipped with a reason
outside CI, failing under CI=true.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.origin_server import body_sha256
from tests.client.tun_netns import ORIGIN_V4, SERVER_V4, Namespaces, need_root_and_tools

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

KEY = "pmtud-e2e-test-key"
SERVER_PORT = 50000  # inside a namespace of its own: nothing else is there
PROXY_PORT = 1088
MB = 1_000_000
_CLI = "import sys; from ostp_client.cli import main; sys.exit(main(sys.argv[1:]))"
V4_1500 = 1500 - 28


class Path1500:
    def __init__(self, ns: Namespaces, tmp: Path, origin_port: int) -> None:
        self.ns = ns
        self.tmp = tmp
        self.origin_port = origin_port
        self.control = tmp / "ctl.sock"
        self.daemon_log = tmp / "daemon.log"
        self.server_log = tmp / "server.log"

    def status(self) -> dict[str, Any]:
        out = self.ns.exec(
            self.ns.client,
            sys.executable, "-c", _CLI, "ctl", "--socket", str(self.control), "--json", "status",
            check=False,
        )  # fmt: skip
        try:
            result: dict[str, Any] = json.loads(out)
        except ValueError:
            return {}
        return result

    def session(self) -> dict[str, Any]:
        for outbound in self.status().get("outbounds", []):
            if outbound.get("id") == "proxy" and outbound.get("sessions"):
                session: dict[str, Any] = outbound["sessions"][0]
                return session
        return {}

    def wait_for(self, predicate: Any, what: str, limit: float = 30) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(
            f"{what}: not within {limit} s; daemon log:\n{self.daemon_log.read_text()[-3000:]}"
            f"\nserver log:\n{self.server_log.read_text()[-3000:]}"
        )

    def curl(self, *args: str) -> str:
        proxy = f"socks5h://127.0.0.1:{PROXY_PORT}"
        return self.ns.exec(
            self.ns.client, "curl", "-sS", "--max-time", "400", "-x", proxy, *args, timeout=450
        )


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path1500]:
    need_root_and_tools("nft", "curl")
    ns = Namespaces(mtu=1500)
    tmp = tmp_path_factory.mktemp("pmtud")
    try:
        ns.setup()
        ns.drop_fragments()
        env = Path1500(ns, tmp, ns.start_origin())
        server_config = tmp / "server.json"
        server_config.write_text(
            json.dumps({"listen": f"{SERVER_V4}:{SERVER_PORT}", "access_keys": [KEY]})
        )
        ns.popen(
            ns.server,
            [sys.executable, "-m", "ostp_server.cli", "run", "-c", str(server_config)],
            stdout=env.server_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        daemon_config = tmp / "daemon.json"
        daemon_config.write_text(
            json.dumps(
                {
                    "inbounds": [{"type": "local_proxy", "port": PROXY_PORT}],
                    "outbounds": [
                        {
                            "type": "ostp",
                            "tag": "proxy",
                            "server": f"{SERVER_V4}:{SERVER_PORT}",
                            "access_key": KEY,
                        }
                    ],
                    "control": {"socket": str(env.control)},
                    "log": {"level": "info"},
                }
            )
        )
        ns.popen(
            ns.client,
            [sys.executable, "-c", _CLI, "run", "-c", str(daemon_config)],
            stdout=env.daemon_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        env.wait_for(lambda: env.session().get("state") == "connected", "session connected")
        yield env
    finally:
        ns.teardown()


def test_100_mb_download_byte_exact_without_a_single_fragment(path: Path1500) -> None:
    out = path.tmp / "download.bin"
    size = 100 * MB
    path.curl("-o", str(out), f"http://{ORIGIN_V4}:{path.origin_port}/bytes/{size}")
    assert out.stat().st_size == size
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    out.unlink()
    assert digest.hexdigest() == body_sha256(size)
    # the client found the first hop's size (and went no further: 1,473 bytes would be refused)
    assert path.session()["datagram_size"] == V4_1500
    assert path.ns.fragments_dropped() == 0  # DF on every datagram: nothing was fragmented
    assert "Traceback" not in path.daemon_log.read_text() + path.server_log.read_text()


def test_20_mb_upload_byte_exact(path: Path1500) -> None:
    data = path.tmp / "up.bin"
    payload = hashlib.sha256(b"pmtud").digest() * (20 * MB // 32)
    data.write_bytes(payload)
    out = path.curl("--data-binary", f"@{data}", f"http://{ORIGIN_V4}:{path.origin_port}/upload")
    assert json.loads(out) == {
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert path.session()["datagram_size"] == V4_1500
    assert path.ns.fragments_dropped() == 0
