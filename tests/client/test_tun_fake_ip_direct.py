"""End to end: a domain routed to `direct` under a TUN with ``auto_route`` AND ``fake_ip``.

The client namespace is a real machine's (default routes via the server namespace, see
`tun_netns.py`) whose resolv.conf names a DNS responder in the server namespace: ``ip netns
exec`` bind-mounts ``/etc/netns/<ns>/resolv.conf`` over ``/etc/resolv.conf``, for curl and for
the daemon alike. curl's own query enters the TUN and gets a fake address; its connection to that
address is routed by name (``origin.test`` → `direct`); `direct` must resolve the name with
queries that carry the routing mark (its stub resolver), not through the system resolver, whose
unmarked query would enter the TUN again and come back with a fake address too. The second test
is the proof: with the stub patched out, the download fails. Needs root and curl: skipped
outside CI, failing under CI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from subprocess import PIPE

import pytest

from tests.client import tun_netns
from tests.client.origin_server import body_sha256
from tests.client.tun_netns import CLIENT_V4, DNS_V4, ORIGIN_V4, Namespaces, need_root_and_tools

pytestmark = [pytest.mark.timeout(90)]

TUN = "ostp0"
TUN_V4, TUN_V6 = "198.18.0.1", "fdfe:dcba:9876::1"
FAKE_RANGES = ("198.18.0.0/15", "fc00::/18")  # the TUN's defaults
SIZE = 4096

# the daemon with the stub resolver replaced by the system resolver (the behaviour before)
_CLI_WITHOUT_STUB = (
    "import sys; from ostp_client.dns.resolver import StubResolver as S; "
    "S.resolve = lambda self, host, family=0, mark=None: S._system(self, host, family); "
    "from ostp_client.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Env:
    def __init__(self, ns: Namespaces, port: int, tmp: Path) -> None:
        self.ns = ns
        self.port = port
        self.tmp = tmp
        self.count = 0

    def start(self) -> tuple[subprocess.Popen[str], Path]:
        self.count += 1
        config = {
            "log": {"level": "debug"},
            "control": {"socket": str(self.tmp / f"d{self.count}.sock")},
            "inbounds": [
                {
                    "type": "tun",
                    "tag": "tun-in",
                    "name": TUN,
                    "mtu": 1500,
                    "address": [f"{TUN_V4}/30", f"{TUN_V6}/126"],
                    "auto_route": True,
                    "dns_hijack": True,
                    "fake_ip": True,
                }
            ],
            "outbounds": [{"type": "block", "tag": "block"}, {"type": "direct", "tag": "direct"}],
            "routing": {
                "rules": [{"domain": ["origin.test"], "outbound": "direct"}],
                "default_outbound": "block",
            },
        }
        path = self.tmp / f"d{self.count}.json"
        path.write_text(json.dumps(config))
        log = self.tmp / f"d{self.count}.log"
        return self.ns.start_daemon(path, TUN, log), log

    def stop(self, proc: subprocess.Popen[str], log: Path) -> str:
        code = self.ns.stop(proc)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        return text

    def curl(self, url: str, max_time: int = 15) -> tuple[int, bytes, str]:
        """(curl's exit code, the body, "local_ip remote_ip")."""
        out = self.tmp / "body.bin"
        out.unlink(missing_ok=True)
        result = subprocess.run(
            [
                *(
                    "ip",
                    "netns",
                    "exec",
                    self.ns.client,
                    "curl",
                    "-sS",
                    "--max-time",
                    str(max_time),
                ),
                *("-o", str(out), "-w", "%{local_ip} %{remote_ip}", url),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        body = out.read_bytes() if out.exists() else b""
        return result.returncode, body, result.stdout.strip()

    def origin_clients(self) -> list[str]:
        text = self.ns.exec(self.ns.server, "curl", "-sS", f"http://127.0.0.1:{self.port}/_log")
        return [str(entry["client"]).removeprefix("::ffff:") for entry in json.loads(text)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    need_root_and_tools("curl")
    ns = Namespaces(mtu=1500, default_route=True)
    netns_etc = Path("/etc/netns") / ns.client
    try:
        ns.setup()
        netns_etc.mkdir(parents=True)
        (netns_etc / "resolv.conf").write_text(f"nameserver {DNS_V4}\n")
        port = ns.start_origin()
        # tun_netns's responder, bound to its address: one bound to 0.0.0.0 answers from the
        # veth's address, and resolvers (glibc's and ours) drop answers from another source
        code = tun_netns.DNS_CODE.replace('("0.0.0.0", 53)', f'("{DNS_V4}", 53)')
        assert code != tun_netns.DNS_CODE
        dns = ns.popen(
            ns.server, [sys.executable, "-c", code, f"origin.test={ORIGIN_V4}"], stdout=PIPE
        )
        assert dns.stdout is not None and dns.stdout.readline().strip() == "ready"
        yield Env(ns, port, tmp_path_factory.mktemp("fakeip"))
    finally:
        ns.teardown()
        shutil.rmtree(netns_etc, ignore_errors=True)


def _expected() -> str:
    return body_sha256(SIZE)


def test_domain_to_direct_under_fake_ip_reaches_the_origin(env: Env) -> None:
    url = f"http://origin.test:{env.port}/bytes/{SIZE}"
    # without the daemon: the namespace's resolv.conf and routes reach the origin directly
    code, body, addresses = env.curl(url)
    assert code == 0 and addresses == f"{CLIENT_V4} {ORIGIN_V4}"
    proc, log = env.start()
    try:
        for _ in range(2):  # the second one from the stub's cache
            code, body, addresses = env.curl(url)
            assert code == 0, (code, addresses)
            assert hashlib.sha256(body).hexdigest() == _expected() and len(body) == SIZE
            local, remote = addresses.split()
            assert local in (TUN_V4, TUN_V6)  # curl's connection entered the TUN ...
            assert any(ip_address(remote) in ip_network(n) for n in FAKE_RANGES)  # to a fake IP
            assert env.origin_clients()[-1] == CLIENT_V4  # direct's left over the veth
        # a name no rule sends to direct is blocked: the routing went by name
        code, _, _ = env.curl(f"http://other.test:{env.port}/bytes/10")
        assert code != 0
    finally:
        text = env.stop(proc, log)
    assert text.count("-> origin.test:") == 2, text[-3000:]  # one connection per download


def test_without_the_stub_resolver_the_fake_answer_is_refused_not_looped(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tun_netns, "_CLI", _CLI_WITHOUT_STUB)
    seen = len(env.origin_clients())
    proc, log = env.start()
    try:
        code, body, addresses = env.curl(f"http://origin.test:{env.port}/bytes/{SIZE}", 3)
        # direct got a fake address from the system resolver and never reached the origin
        assert code != 0 and len(body) != SIZE, (code, addresses)
        assert len(env.origin_clients()) == seen
    finally:
        text = env.stop(proc, log)
    # Without the guard, direct connected to the fake address, i.e. into the TUN, which routed
    # that connection by name to direct again, and so on (over 1,000 a second). With it, direct
    # refuses the TUN's own addresses: one attempt per request, and a clear reason.
    assert "fake addresses (would loop)" in text, text[-3000:]
    assert text.count("-> origin.test:") <= 2, text[-3000:]
