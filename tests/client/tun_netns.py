"""Two network namespaces for the TUN tests, path-MTU tests and the netstack benchmark.

```
 client ns ("c")                                   server ns ("s")
  curl → 203.0.113.10 ─┐                            lo: 203.0.113.10, 2001:db8:2::10 (origins)
        ostp0 (TUN) ◄──┘ split default routes       veth 192.0.2.2/24, 2001:db8:1::2/64
  daemon ── veth 192.0.2.1/24, 2001:db8:1::1/64 ─────┘  (origin HTTP, DNS responder, ostp-server)
```

By default the client namespace has no route to 203.0.113.0/24 or 2001:db8:2::/48 but the TUN's,
so curl's traffic enters the TUN; the daemon reaches the server namespace over the veth pair (the
`direct` outbound with `override_address` 192.0.2.2, or `ostp` to an ostp-server at 192.0.2.2).
With `default_route=True` the client namespace is a real machine's: default routes via the
server namespace in its main table, which the TUN's policy routing takes over (and which the
daemon's marked sockets keep using). With `drop_fragments()` both ends of the veth drop IP
fragments at ingress, as many middleboxes (and most IPv6 paths) do: a datagram larger than the
veth's MTU then never arrives, whatever sends it. Every address is a documentation range inside
namespaces this module creates and deletes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
CLIENT_V4, SERVER_V4 = "192.0.2.1", "192.0.2.2"
CLIENT_V6, SERVER_V6 = "2001:db8:1::1", "2001:db8:1::2"
ORIGIN_V4, ORIGIN_V6 = "203.0.113.10", "2001:db8:2::10"
DNS_V4 = "203.0.113.53"

ORIGIN_CODE = """
import socket, sys
sys.path.insert(0, sys.argv[1])
import origin_server as o
import threading
class S(o._Server):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
s = S(("::", int(sys.argv[2])), o._Handler)
s.log = []
s.lock = threading.Lock()
print(s.server_address[1], flush=True)
s.serve_forever()
"""

DNS_CODE = """
import socket, struct, sys
answers = {}
for item in sys.argv[1:]:
    name, ip = item.split("=")
    answers[name] = socket.inet_aton(ip)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    ident, flags, qd = struct.unpack_from("!HHH", data)
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1 : i + 1 + data[i]].decode())
        i += 1 + data[i]
    question = data[12 : i + 5]
    name = ".".join(labels).lower()
    qtype = struct.unpack_from("!H", data, i + 1)[0]
    ip = answers.get(name) if qtype == 1 else None
    rcode = 0 if name in answers else 3
    head = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, 1 if ip else 0, 0, 0)
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + ip if ip else b""
    s.sendto(head + question + rr, peer)
"""


_CLI = "import sys; from ostp_client.cli import main; sys.exit(main(sys.argv[1:]))"


def need_root_and_tools(*tools: str) -> None:
    """Skip (outside CI) unless root with /dev/net/tun and the tools; fail in CI."""
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, TUN device)"
    elif not os.path.exists("/dev/net/tun"):
        reason = "needs /dev/net/tun"
    elif missing:
        reason = f"needs {', '.join(missing)}"
    if reason is not None:
        skip_or_fail(reason)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """Create with `setup()`, remove with `teardown()` (also kills processes started here)."""

    def __init__(self, mtu: int = 1500, *, default_route: bool = False) -> None:
        tag = secrets.token_hex(3)
        self.client = f"ostpt-c-{tag}"
        self.server = f"ostpt-s-{tag}"
        self._veth_c = f"otc{tag}"
        self._veth_s = f"ots{tag}"
        self.mtu = mtu
        self.default_route = default_route
        self.processes: list[subprocess.Popen[str]] = []

    def setup(self) -> None:
        c, s = self.client, self.server
        _run("ip", "netns", "add", c)
        _run("ip", "netns", "add", s)
        _run("ip", "link", "add", self._veth_c, "type", "veth", "peer", "name", self._veth_s)
        _run("ip", "link", "set", self._veth_c, "netns", c)
        _run("ip", "link", "set", self._veth_s, "netns", s)
        for ns, dev, v4, v6 in (
            (c, self._veth_c, CLIENT_V4, CLIENT_V6),
            (s, self._veth_s, SERVER_V4, SERVER_V6),
        ):
            self.ip(ns, "link", "set", "lo", "up")
            self.ip(ns, "link", "set", dev, "mtu", str(self.mtu), "up")
            self.ip(ns, "addr", "add", f"{v4}/24", "dev", dev)
            self.ip(ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        for address in (f"{ORIGIN_V4}/32", f"{DNS_V4}/32", f"{ORIGIN_V6}/128"):
            self.ip(s, "addr", "add", address, "dev", "lo")
        if self.default_route:
            self.ip(c, "route", "add", "default", "via", SERVER_V4)
            self.ip(c, "-6", "route", "add", "default", "via", SERVER_V6)

    def ip(self, ns: str, *args: str) -> str:
        return _run("ip", "-n", ns, *args).stdout

    def drop_fragments(self) -> None:
        """Drop IPv4 and IPv6 fragments arriving on either veth end (needs `nft`).

        In the netdev family's ingress hook, before the kernel reassembles anything: every
        IPv4 packet with MF set or a non-zero fragment offset (first, middle and last fragments)
        and every IPv6 packet with a Fragment header. Unfragmented packets pass, DF or not.
        """
        for ns, dev in ((self.client, self._veth_c), (self.server, self._veth_s)):
            ruleset = (
                "table netdev ostp_frag {\n"
                "  chain ingress {\n"
                f'    type filter hook ingress device "{dev}" priority -500; policy accept;\n'
                "    ip frag-off & 0x3fff != 0 counter drop\n"
                "    exthdr frag exists counter drop\n"
                "  }\n"
                "}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=ruleset,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )

    def drop_udp_to_server(self, port: int) -> None:
        """Silently drop UDP towards ``port`` as it enters the server namespace (needs `nft`):
        a path where UDP does not pass (a censor, a firewall) while TCP to the same port does."""
        ruleset = (
            "table inet ostp_udp {\n"
            "  chain prerouting {\n"
            "    type filter hook prerouting priority -300; policy accept;\n"
            f"    udp dport {port} counter drop\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.server, "nft", "-f", "-"],
            input=ruleset,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )

    def pass_udp_to_server(self) -> None:
        """Undo :meth:`drop_udp_to_server`."""
        self.exec(self.server, "nft", "delete", "table", "inet", "ostp_udp")

    def udp_dropped(self) -> int:
        """Datagrams the :meth:`drop_udp_to_server` rule dropped so far."""
        listing = self.exec(self.server, "nft", "list", "table", "inet", "ostp_udp")
        words = listing.split()
        return sum(int(v) for w, v in itertools.pairwise(words) if w == "packets")

    def fragments_dropped(self) -> int:
        """Fragments the `drop_fragments()` rules dropped so far, both namespaces together."""
        total = 0
        for ns in (self.client, self.server):
            listing = self.exec(ns, "nft", "list", "table", "netdev", "ostp_frag")
            for word, value in zip(listing.split(), listing.split()[1:], strict=False):
                if word == "packets":
                    total += int(value)
        return total

    def table(self, table: int, family: str = "-4") -> str:
        """``ip route show table N`` in the client namespace ("" when the table never existed)."""
        return _run(
            "ip", "-n", self.client, family, "route", "show", "table", str(table), check=False
        ).stdout

    def rules(self, family: str = "-4") -> str:
        return self.ip(self.client, family, "rule", "show")

    def exec(self, ns: str, *args: str, timeout: float = 60, check: bool = True) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", ns, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def popen(self, ns: str, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *args], text=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def start_origin(self) -> int:
        proc = self.popen(
            self.server,
            [sys.executable, "-c", ORIGIN_CODE, str(ROOT / "tests" / "client"), "0"],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        return int(proc.stdout.readline())

    def start_dns(self, answers: dict[str, str]) -> None:
        args = [f"{k}={v}" for k, v in answers.items()]
        proc = self.popen(
            self.server, [sys.executable, "-c", DNS_CODE, *args], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    def start_daemon(
        self, config_path: Path, tun_name: str, log_path: Path, *, table: int = 2022
    ) -> subprocess.Popen[str]:
        """Start `ostp-client run` in the client namespace; return once auto_route is in place
        (the device's IPv6 route in ``table``, then the IPv6 tunnel rule, the last thing it
        installs)."""
        log = log_path.open("w")
        proc = self.popen(
            self.client,
            [sys.executable, "-c", _CLI, "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {log_path.read_text()[-3000:]}")
            # the device's route in the table first: rules may be a crashed run's leftovers
            if f"default dev {tun_name}" in self.table(table, "-6"):
                rules = _run("ip", "-n", self.client, "-6", "rule", check=False).stdout
                if f"lookup {table}" in rules:
                    return proc
            time.sleep(0.1)
        raise AssertionError(f"daemon did not set up {tun_name}: {log_path.read_text()[-3000:]}")

    def stop(self, proc: subprocess.Popen[str], timeout: float = 10) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                return -9
        return proc.returncode

    def teardown(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for ns in (self.client, self.server):
            _run("ip", "netns", "del", ns, check=False)
