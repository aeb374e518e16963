"""End to end: curl in a network namespace → real TUN device → netstack → router → outbound.

The daemon runs inside the client namespace (see `tun_netns.py` for the picture); (a) the
`direct` outbound, (b) `ostp` through a real `ostp-server` in the server namespace. Needs root
and curl: skipped with a reason outside CI, failing under CI=true.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.origin_server import body_sha256
from tests.client.tun_netns import (
    DNS_V4,
    ORIGIN_V4,
    ORIGIN_V6,
    SERVER_V4,
    Namespaces,
    need_root_and_tools,
)

pytestmark = [pytest.mark.timeout(120)]

TUN = "ostp0"
KEY = "tun-e2e-test-key"
MB = 1_000_000


class Env:
    def __init__(self, ns: Namespaces, port: int, tmp: Path) -> None:
        self.ns = ns
        self.port = port
        self.tmp = tmp

    def daemon(self, config: dict[str, Any], name: str) -> _Daemon:
        return _Daemon(self, config, name)

    def curl(self, url: str, *extra: str, check: bool = True) -> str:
        return self.ns.exec(
            self.ns.client, "curl", "-sS", "-g", "--max-time", "50", *extra, url, check=check
        )


class _Daemon:
    def __init__(self, env: Env, config: dict[str, Any], name: str) -> None:
        self.env = env
        config.setdefault("log", {"level": "info"})
        config["control"] = {"socket": str(env.tmp / f"{name}.sock")}
        self.config_path = env.tmp / f"{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.log = env.tmp / f"{name}.log"
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> _Daemon:
        self.proc = self.env.ns.start_daemon(self.config_path, TUN, self.log)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        code = self.env.ns.stop(self.proc)
        routes = self.env.ns.ip(self.env.ns.client, "route") + self.env.ns.ip(
            self.env.ns.client, "-6", "route"
        )
        if exc[0] is None:
            assert code == 0, self.log.read_text()[-3000:]
            assert TUN not in routes, routes  # routes (and the device) are gone
            assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


def tun_inbound(**extra: Any) -> dict[str, Any]:
    return {"type": "tun", "tag": "tun-in", "name": TUN, "mtu": 9000, **extra}


def direct_config(**tun: Any) -> dict[str, Any]:
    return {
        "inbounds": [tun_inbound(**tun)],
        "outbounds": [{"type": "direct", "tag": "direct", "override_address": SERVER_V4}],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    need_root_and_tools("curl")
    ns = Namespaces(mtu=9000)
    try:
        ns.setup()
        port = ns.start_origin()
        ns.start_dns({"origin.test": ORIGIN_V4})
        yield Env(ns, port, tmp_path_factory.mktemp("tun"))
    finally:
        ns.teardown()


def _sha_of_download(env: Env, url: str) -> str:
    out = env.tmp / "download.bin"
    env.curl(url, "-o", str(out))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def _origin_log(env: Env) -> list[dict[str, Any]]:
    text = env.ns.exec(env.ns.server, "curl", "-sS", f"http://127.0.0.1:{env.port}/_log")
    return list(json.loads(text))


# --------------------------------------------------------------------------------------------
# (a) direct


def test_direct_50mb_byte_exact_and_routes(env: Env) -> None:
    with env.daemon(direct_config(), "direct50"):
        routes = env.ns.table(2022)
        assert f"default dev {TUN}" in routes
        routes6 = env.ns.table(2022, "-6")
        assert f"default dev {TUN}" in routes6
        url = f"http://{ORIGIN_V4}:{env.port}/bytes/{50 * MB}"
        assert _sha_of_download(env, url) == body_sha256(50 * MB)
        # the origin saw the daemon's outbound connection, not the application's address
        assert _origin_log(env)[-1]["client"].endswith(SERVER_V4.rsplit(".", 1)[0] + ".1")


def test_direct_upload_byte_exact(env: Env) -> None:
    data = env.tmp / "up.bin"
    payload = hashlib.sha256(b"up").digest() * (20 * MB // 32)
    data.write_bytes(payload)
    with env.daemon(direct_config(), "upload"):
        out = env.curl(f"http://{ORIGIN_V4}:{env.port}/upload", "--data-binary", f"@{data}")
    answer = json.loads(out)
    assert answer == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_direct_100_connections_at_once(env: Env) -> None:
    sizes = [1000 + 7919 * i for i in range(100)]
    args: list[str] = ["--parallel", "--parallel-max", "100", "--parallel-immediate"]
    outdir = env.tmp / "parallel"
    outdir.mkdir()
    for i, size in enumerate(sizes):
        args += ["-o", str(outdir / f"{i}.bin"), f"http://{ORIGIN_V4}:{env.port}/bytes/{size}"]
    with env.daemon(direct_config(), "parallel"):
        env.ns.exec(env.ns.client, "curl", "-sS", "--max-time", "50", *args)
    for i, size in enumerate(sizes):
        got = (outdir / f"{i}.bin").read_bytes()
        assert len(got) == size and hashlib.sha256(got).hexdigest() == body_sha256(size), i


def test_direct_ipv6(env: Env) -> None:
    with env.daemon(direct_config(), "ipv6"):
        url = f"http://[{ORIGIN_V6}]:{env.port}/bytes/{5 * MB}"
        assert _sha_of_download(env, url) == body_sha256(5 * MB)


QUERY_CODE = """
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
q += b"\\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(q, (server, 53))
data, peer = s.recvfrom(4096)
ident, flags, qd, an = struct.unpack_from("!HHHH", data)
print(peer[0], hex(ident), flags & 0xF, an, socket.inet_ntoa(data[-4:]) if an else "-")
"""


def _query(env: Env, name: str, server: str = DNS_V4) -> list[str]:
    out = env.ns.exec(env.ns.client, sys.executable, "-c", QUERY_CODE, name, server)
    return out.split()


def test_dns_query_through_the_tunnel(env: Env) -> None:
    with env.daemon(direct_config(dns_hijack=True), "dns"):
        # 203.0.113.53 is routed only into the TUN: the answer came through the tunnel
        assert _query(env, "origin.test") == [DNS_V4, "0x4242", "0", "1", ORIGIN_V4]
        assert _query(env, "missing.test") == [DNS_V4, "0x4242", "3", "0", "-"]


UDP_ECHO_CODE = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 7007))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data[::-1], peer)
"""

UDP_CLIENT_CODE = """
import socket, sys
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(5)
for i in range(3):
    s.sendto(b"hello %d" % i, (host, 7007))
    print(s.recvfrom(100)[0].decode())
"""


def test_udp_flow_both_families(env: Env) -> None:
    proc = env.ns.popen(
        env.ns.server, [sys.executable, "-c", UDP_ECHO_CODE], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    with env.daemon(direct_config(), "udp"):
        for host in (ORIGIN_V4, ORIGIN_V6):
            out = env.ns.exec(env.ns.client, sys.executable, "-c", UDP_CLIENT_CODE, host)
            assert out.split("\n")[:3] == ["0 olleh", "1 olleh", "2 olleh"]


def test_fake_ip_lets_domain_rules_apply(env: Env) -> None:
    config = {
        "inbounds": [tun_inbound(fake_ip=True)],
        "outbounds": [
            {"type": "block", "tag": "block"},
            {"type": "direct", "tag": "origin", "override_address": SERVER_V4},
        ],
        "routing": {
            "rules": [{"domain_suffix": ["origin.test"], "outbound": "origin"}],
            "default_outbound": "block",
        },
    }
    with env.daemon(config, "fakeip"):
        peer, _ident, rcode, count, fake = _query(env, "www.origin.test")
        assert (peer, rcode, count) == (DNS_V4, "0", "1")
        fake_ip = ipaddress.ip_address(fake)
        assert fake_ip in ipaddress.ip_network("198.18.0.0/15")
        assert fake_ip not in ipaddress.ip_network("198.18.0.0/30")  # not the TUN's own
        assert _query(env, "www.origin.test")[4] == fake  # stable
        body = env.curl(f"http://{fake}:{env.port}/whoami")
        assert json.loads(body)["host"] == f"{fake}:{env.port}"
        # the same origin by address matches no rule: the block outbound refuses it
        out = env.curl(f"http://{ORIGIN_V4}:{env.port}/whoami", check=False)
        assert "whoami" not in out and "client" not in out


# --------------------------------------------------------------------------------------------
# (b) ostp through ostp-server


def _start_ostp_server(env: Env) -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    config = env.tmp / "server.json"
    config.write_text(json.dumps({"listen": f"{SERVER_V4}:{port}", "access_keys": [KEY]}))
    log = (env.tmp / "server.log").open("w")
    env.ns.popen(
        env.ns.server,
        [sys.executable, "-m", "ostp_server.cli", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return port


def test_ostp_through_ostp_server(env: Env) -> None:
    try:
        import ostp_server.cli  # noqa: F401
    except ImportError:
        pytest.fail("ostp-server is not installed")
    port = _start_ostp_server(env)
    config = {
        "inbounds": [tun_inbound()],
        "outbounds": [
            {
                "type": "ostp",
                "tag": "proxy",
                "server": f"{SERVER_V4}:{port}",
                "access_key": KEY,
                "mtu": 1400,
            }
        ],
    }
    with env.daemon(config, "ostp"):
        # the server's address keeps its main-table route (a throw route in the TUN's table)
        assert f"throw {SERVER_V4}" in env.ns.table(2022)
        url = f"http://{ORIGIN_V4}:{env.port}/bytes/{50 * MB}"
        assert _sha_of_download(env, url) == body_sha256(50 * MB)
        url6 = f"http://[{ORIGIN_V6}]:{env.port}/bytes/{MB}"
        assert _sha_of_download(env, url6) == body_sha256(MB)
        assert _query(env, "origin.test") == [DNS_V4, "0x4242", "0", "1", ORIGIN_V4]
    assert env.ns.table(2022).strip() == ""


def test_dns_query_struct_is_valid() -> None:
    # the helper's query must be a well-formed DNS message (checked with our own parser)
    from ostp_client.dns.codec import parse_query

    q = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x06origin\x04test\x00\x00\x01\x00\x01"
    assert parse_query(q).name == "origin.test"
