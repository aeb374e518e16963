"""The fragment-dropping path of `tun_netns.Namespaces.drop_fragments()`, at the UDP level.

Two namespaces joined by a veth of MTU 1500. Without the rules a 4,200-byte UDP datagram (the
size our server and upstream's send today) arrives in three IP fragments; with them it never
arrives, over IPv4 and IPv6, while a 1,400-byte one does: the failure mode of every transfer
over such a path. With DF set and the kernel's PMTU ignored (``IP_PMTUDISC_PROBE``, how path MTU
probes are sent), 1,472 bytes of UDP payload pass and 1,473 are refused at once with
``EMSGSIZE``, which is what a probe larger than the first hop meets.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from .tun_netns import SERVER_V4, SERVER_V6, Namespaces, need_root_and_tools

pytestmark = pytest.mark.root

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 0))
print(s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(65535)
    print("END" if data == b"E" else len(data), flush=True)
"""

SENDER = """
import errno, socket, sys
host, port, mode, *sizes = sys.argv[1:]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if mode == "probe":  # DF set, the kernel's path MTU ignored: how DPLPMTUD sends probes
    # linux/in.h IP_MTU_DISCOVER 10, in6.h IPV6_MTU_DISCOVER 23; *_PMTUDISC_PROBE 3
    if family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10), 3)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23), 3)
for size in sizes:
    try:
        s.sendto(b"x" * int(size), (host, int(port)))
        print(size, "sent")
    except OSError as e:
        print(size, errno.errorcode[e.errno])
s.sendto(b"E", (host, int(port)))
"""


class Receiver:
    """A UDP receiver in the server namespace; yields the sizes of each batch up to a marker."""

    def __init__(self, ns: Namespaces) -> None:
        self.ns = ns
        self.proc = ns.popen(ns.server, [sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def batch(self, host: str, mode: str, *sizes: int) -> tuple[list[int], dict[int, str]]:
        """Send ``sizes`` then the end marker from the client namespace; what arrived, and
        how each send went ("sent" or the errno name)."""
        out = self.ns.exec(
            self.ns.client,
            sys.executable, "-c", SENDER, host, str(self.port), mode, *map(str, sizes),
        )  # fmt: skip
        sends = {int(size): result for size, result in (line.split() for line in out.splitlines())}
        got: list[int] = []
        deadline = time.monotonic() + 20
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no end marker from the receiver; got {got}") from None
            if line == "END":  # the veth keeps order: all that will arrive came before
                return got, sends
            got.append(int(line))


@pytest.fixture(scope="module")
def path() -> Iterator[tuple[Namespaces, Receiver]]:
    need_root_and_tools("nft")
    ns = Namespaces(mtu=1500)
    try:
        ns.setup()
        yield ns, Receiver(ns)
    finally:
        ns.teardown()


@pytest.mark.parametrize("host", [SERVER_V4, SERVER_V6])
def test_fragments_are_dropped_and_fitting_datagrams_pass(
    path: tuple[Namespaces, Receiver], host: str
) -> None:
    ns, receiver = path
    ns.exec(ns.client, "nft", "delete", "table", "netdev", "ostp_frag", check=False)
    ns.exec(ns.server, "nft", "delete", "table", "netdev", "ostp_frag", check=False)
    got, _ = receiver.batch(host, "plain", 4200, 1400)
    assert sorted(got) == [1400, 4200]  # the kernel fragments 4,200 bytes, the peer reassembles
    ns.drop_fragments()
    got, sends = receiver.batch(host, "plain", 4200, 1400)
    assert sends == {4200: "sent", 1400: "sent"}
    assert got == [1400]
    assert ns.fragments_dropped() >= 3  # 4,200 bytes of UDP make three fragments at MTU 1500


def test_probes_pass_up_to_the_mtu_and_are_refused_above_it(
    path: tuple[Namespaces, Receiver],
) -> None:
    ns, receiver = path
    ns.exec(ns.client, "nft", "delete", "table", "netdev", "ostp_frag", check=False)
    ns.exec(ns.server, "nft", "delete", "table", "netdev", "ostp_frag", check=False)
    ns.drop_fragments()
    got, sends = receiver.batch(SERVER_V4, "probe", 1472, 1473, 4200)
    assert sends == {1472: "sent", 1473: "EMSGSIZE", 4200: "EMSGSIZE"}
    assert got == [1472]
    got, sends = receiver.batch(SERVER_V6, "probe", 1452, 1453)
    assert sends == {1452: "sent", 1453: "EMSGSIZE"}
    assert got == [1452]
