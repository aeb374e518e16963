"""End to end: `auto_route` by policy routing on a namespace that looks like a real machine.

The client namespace has default routes via the server namespace in its main table (see
`tun_netns.py`, ``default_route=True``), and the `direct` outbound has NO `override_address`:
curl's traffic is routed into the TUN by the daemon's rules and table, and `direct`'s own
sockets, which carry the routing mark, leave over the veth by the main table instead of looping
back into the tunnel. Proof of both paths in every test: curl's local address is the TUN's and
the origin sees the veth address. Needs root and curl: skipped outside CI, failing under CI.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.origin_server import body_sha256
from tests.client.tun_netns import (
    CLIENT_V4,
    CLIENT_V6,
    DNS_V4,
    ORIGIN_V4,
    ORIGIN_V6,
    SERVER_V4,
    Namespaces,
    need_root_and_tools,
)

pytestmark = [pytest.mark.timeout(120)]

TUN = "ostp0"
TUN_V4, TUN_V6 = "198.18.0.1", "fdfe:dcba:9876::1"
TABLE, MARK, PRIORITY = 2022, 0x2022, 9020
MB = 1_000_000
SUPPRESS_RULE = f"{PRIORITY}:\tfrom all lookup main suppress_prefixlength 0"
TUNNEL_RULE = f"{PRIORITY + 1}:\tnot from all fwmark {MARK:#x} lookup {TABLE}"


class Env:
    def __init__(self, ns: Namespaces, port: int, tmp: Path) -> None:
        self.ns = ns
        self.port = port
        self.tmp = tmp
        self.count = 0

    def start(self, **tun: Any) -> tuple[subprocess.Popen[str], Path]:
        self.count += 1
        config = {
            "log": {"level": "info"},
            "control": {"socket": str(self.tmp / f"d{self.count}.sock")},
            "inbounds": [{"type": "tun", "tag": "tun-in", "name": TUN, "mtu": 9000, **tun}],
            "outbounds": [{"type": "direct", "tag": "direct"}],
        }
        path = self.tmp / f"d{self.count}.json"
        path.write_text(json.dumps(config))
        log = self.tmp / f"d{self.count}.log"
        return self.ns.start_daemon(path, TUN, log), log

    def stop(self, proc: subprocess.Popen[str], log: Path) -> None:
        code = self.ns.stop(proc)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]

    def download(self, url: str) -> tuple[str, str]:
        """(sha256 of the body, curl's local address)."""
        out = self.tmp / "download.bin"
        local = self.ns.exec(
            self.ns.client,
            *("curl", "-sS", "-g", "--max-time", "50", "-o", str(out)),
            *("-w", "%{local_ip}", url),
        )
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return digest, local.strip()

    def origin_clients(self) -> list[str]:
        text = self.ns.exec(self.ns.server, "curl", "-sS", f"http://127.0.0.1:{self.port}/_log")
        return [str(entry["client"]) for entry in json.loads(text)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    need_root_and_tools("curl")
    ns = Namespaces(mtu=9000, default_route=True)
    try:
        ns.setup()
        port = ns.start_origin()
        ns.start_dns({"origin.test": ORIGIN_V4})
        yield Env(ns, port, tmp_path_factory.mktemp("policy"))
    finally:
        ns.teardown()


def _ours(rules: str) -> list[str]:
    """The rules auto_route owns (by table and priority), as `ip rule show` prints them."""
    return [
        line.strip()
        for line in rules.splitlines()
        if f"lookup {TABLE}" in line or line.startswith(f"{PRIORITY}:")
    ]


def _assert_clean(ns: Namespaces) -> None:
    for family in ("-4", "-6"):
        assert _ours(ns.rules(family)) == [], ns.rules(family)
        assert ns.table(TABLE, family).strip() == "", ns.table(TABLE, family)
    assert TUN not in ns.ip(ns.client, "link")


def _host(address: str) -> str:
    return address.removeprefix("::ffff:")


def test_direct_without_override_20mb_rules_and_cleanup(env: Env) -> None:
    ns = env.ns
    # without the daemon, the origin is reached over the veth by the main table
    _, local = env.download(f"http://{ORIGIN_V4}:{env.port}/bytes/10")
    assert local == CLIENT_V4
    proc, log = env.start()
    try:
        for family in ("-4", "-6"):
            assert _ours(ns.rules(family)) == [SUPPRESS_RULE, TUNNEL_RULE], ns.rules(family)
            assert f"default dev {TUN}" in ns.table(TABLE, family)
        # the kernel's view: unmarked packets go into the TUN, marked ones over the veth
        assert f"dev {TUN} table {TABLE}" in ns.ip(ns.client, "route", "get", ORIGIN_V4)
        marked = ns.ip(ns.client, "route", "get", ORIGIN_V4, "mark", str(MARK))
        assert f"via {SERVER_V4}" in marked and TUN not in marked
        assert "via 2001:db8:1::2" in ns.ip(
            ns.client, "-6", "route", "get", ORIGIN_V6, "mark", str(MARK)
        )
        digest, local = env.download(f"http://{ORIGIN_V4}:{env.port}/bytes/{20 * MB}")
        assert digest == body_sha256(20 * MB)
        assert local == TUN_V4  # curl's connection entered the TUN ...
        assert _host(env.origin_clients()[-1]) == CLIENT_V4  # ... direct's left over the veth
    finally:
        env.stop(proc, log)
    _assert_clean(ns)
    _, local = env.download(f"http://{ORIGIN_V4}:{env.port}/bytes/10")
    assert local == CLIENT_V4  # the machine's own routing is back


def test_ipv6_without_override(env: Env) -> None:
    proc, log = env.start()
    try:
        digest, local = env.download(f"http://[{ORIGIN_V6}]:{env.port}/bytes/{5 * MB}")
        assert digest == body_sha256(5 * MB)
        assert local == TUN_V6
        assert env.origin_clients()[-1] == CLIENT_V6
    finally:
        env.stop(proc, log)
    _assert_clean(env.ns)


QUERY_CODE = """
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
q += b"\\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect((server, 53))
s.send(q)
data = s.recv(4096)
ident, flags, qd, an = struct.unpack_from("!HHHH", data)
print(s.getsockname()[0], hex(ident), flags & 0xF, an, socket.inet_ntoa(data[-4:]) if an else "-")
"""


@pytest.mark.parametrize("hijack", [True, False], ids=["dns_hijack", "plain_udp_flow"])
def test_dns_to_an_outside_resolver_through_the_tun(env: Env, hijack: bool) -> None:
    proc, log = env.start(dns_hijack=hijack)
    try:
        for _ in range(3):
            out = env.ns.exec(
                env.ns.client, sys.executable, "-c", QUERY_CODE, "origin.test", DNS_V4
            )
            # sent from the TUN's address (it entered the tunnel), answered by the resolver
            # in the server namespace, which `direct`'s marked socket reached over the veth
            assert out.split() == [TUN_V4, "0x4242", "0", "1", ORIGIN_V4]
    finally:
        env.stop(proc, log)
    _assert_clean(env.ns)


def _add_leftovers(ns: Namespaces) -> None:
    """What a crashed run leaves (its device, and with it its default routes, are gone), plus
    a rule of somebody else's at a neighbouring priority that must survive."""
    for family, throw in (("-4", "198.51.100.0/24"), ("-6", "2001:db8:99::/48")):
        ns.ip(ns.client, family, "route", "add", "throw", throw, "table", str(TABLE))
        ns.ip(ns.client, family, "rule", "add", "pref", "9500", "lookup", str(TABLE))
        ns.ip(ns.client, family, "rule", "add", "pref", "9030", "lookup", "main")


def test_leftovers_of_a_crashed_run_are_removed(env: Env) -> None:
    ns = env.ns
    proc, _log = env.start()
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait(10)
    _add_leftovers(ns)
    for family in ("-4", "-6"):
        stale = _ours(ns.rules(family))
        assert SUPPRESS_RULE in stale and TUNNEL_RULE in stale and len(stale) == 3, stale
        assert "throw" in ns.table(TABLE, family)
    proc, log = env.start()
    try:
        for family in ("-4", "-6"):
            assert _ours(ns.rules(family)) == [SUPPRESS_RULE, TUNNEL_RULE], ns.rules(family)
            assert "throw" not in ns.table(TABLE, family)
        digest, local = env.download(f"http://{ORIGIN_V4}:{env.port}/bytes/{MB}")
        assert (digest, local) == (body_sha256(MB), TUN_V4)
    finally:
        env.stop(proc, log)
    _assert_clean(ns)
    for family in ("-4", "-6"):
        assert "9030:\tfrom all lookup main" in ns.rules(family)  # not ours: untouched
        ns.ip(ns.client, family, "rule", "del", "pref", "9030")


def test_mark_is_what_keeps_direct_out_of_the_tunnel(env: Env) -> None:
    # the same route lookups without and with the mark, seen from a socket in the namespace
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "if sys.argv[2] != '0': s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[2]))\n"
        "s.connect((sys.argv[1], 9)); print(s.getsockname()[0])\n"
    )
    proc, log = env.start()
    try:
        unmarked = env.ns.exec(env.ns.client, sys.executable, "-c", code, ORIGIN_V4, "0")
        marked = env.ns.exec(env.ns.client, sys.executable, "-c", code, ORIGIN_V4, str(MARK))
        assert (unmarked.strip(), marked.strip()) == (TUN_V4, CLIENT_V4)
    finally:
        env.stop(proc, log)
