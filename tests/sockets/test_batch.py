"""BatchSocket on real loopback sockets: GSO runs, GRO splitting, the fallbacks, EMSGSIZE.

The client reads a connected socket (``recv_batch``), the server a listening one with many peers
(``recv_from_batch``); both send with ``send_batch``. What arrives must be exactly what was sent,
in order, whatever the kernel coalesced on the way. The kernel's own refusals are provoked for
real: ``SO_NO_CHECK`` makes it refuse GSO (``EINVAL``), a datagram over 65,507 bytes or a
namespace's small MTU makes it refuse a size (``EMSGSIZE``), an empty namespace has no route.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_sockets import MAX_SEGMENTS, UDP_GRO, BatchSocket, set_buffers
from tests.conftest import is_root, require

pytestmark = pytest.mark.requires(sys.platform == "linux", "GSO and GRO are Linux's")

SO_NO_CHECK = 11  # asm-generic/socket.h: no UDP checksum on send, which GSO cannot do
LOOPBACK: dict[int, str] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def _datagrams() -> list[bytes]:
    """Runs of every shape: a short last segment, more than MAX_SEGMENTS of one size, more
    than 64 KiB of one size, lone datagrams of sizes of their own; each one distinct."""
    sizes = (
        [1200] * 10
        + [700]
        + [1300] * 3
        + [50]
        + [1000] * (MAX_SEGMENTS + 36)
        + [1400] * 70
        + [9000, 1, 1]
    )
    return [
        i.to_bytes(4, "big") + os.urandom(size - 4) if size >= 4 else b"z"
        for i, size in enumerate(sizes)
    ]


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _udp(stack: ExitStack, family: int) -> socket.socket:
    sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
    sock.bind((LOOPBACK[family], 0))
    sock.setblocking(False)
    set_buffers(sock, 4 << 20)
    return sock


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_a_listening_socket_gets_every_datagram_with_its_source(
    sockets: ExitStack, family: int, gso: bool, gro: bool
) -> None:
    """The server's shape: one socket, many peers, each datagram with its source."""
    receiver = BatchSocket(_udp(sockets, family), gro=gro, count_drops=False, skip_errors=True)
    peers = [BatchSocket(_udp(sockets, family), gso=gso) for _ in range(2)]
    sent: list[tuple[bytes, object]] = []
    to = receiver.sock.getsockname()
    for round_ in range(2):
        for peer in peers:
            datagrams = _datagrams()[round_ * 60 :]
            assert peer.send_batch(datagrams, to) == sum(map(len, datagrams))
            sent += [(d, peer.sock.getsockname()) for d in datagrams]
    got = list(receiver.recv_from_batch(len(sent)))
    assert got == sent
    assert list(receiver.recv_from_batch()) == []
    assert all(peer.send_drop == 0 and not peer.refused and peer.gso == gso for peer in peers)


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_a_connected_socket_gets_every_datagram(
    sockets: ExitStack, family: int, gso: bool, gro: bool
) -> None:
    """The client's shape: a socket connected to its server, both ways."""
    a, b = _udp(sockets, family), _udp(sockets, family)
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    sender, receiver = BatchSocket(a, gso=gso), BatchSocket(b, gro=gro)
    datagrams = _datagrams()
    assert sender.send_batch(datagrams) == sum(map(len, datagrams))
    got = list(receiver.recv_batch(len(datagrams)))
    assert got == datagrams
    assert list(receiver.recv_batch()) == []
    assert receiver.kernel_drops() == 0


@settings(max_examples=60)
@given(
    sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=50),
    gso=st.booleans(),
    gro=st.booleans(),
    connected=st.booleans(),
)
def test_any_sequence_of_sizes_arrives_as_sent(
    sizes: list[int], gso: bool, gro: bool, connected: bool
) -> None:
    """However the datagrams fall into runs (equal sizes, a shorter last one, lone ones), the
    reader gets each one back, whole and in order."""
    datagrams = [bytes([i % 256]) * size for i, size in enumerate(sizes)]
    with ExitStack() as stack:
        a, b = _udp(stack, socket.AF_INET), _udp(stack, socket.AF_INET)
        sender, receiver = BatchSocket(a, gso=gso), BatchSocket(b, gro=gro, skip_errors=True)
        if connected:
            a.connect(b.getsockname())
            b.connect(a.getsockname())
            assert sender.send_batch(datagrams) == sum(sizes)
            assert list(receiver.recv_batch(len(datagrams) + 1)) == datagrams
        else:
            assert sender.send_batch(datagrams, b.getsockname()) == sum(sizes)
            got = list(receiver.recv_from_batch(len(datagrams) + 1))
            assert got == [(d, a.getsockname()) for d in datagrams]
        assert (sender.send_drop, sender.refused) == (0, [])


def test_a_run_leaves_in_one_call_and_arrives_coalesced(sockets: ExitStack, family: int) -> None:
    """GSO is really used: a GRO reader sees the run as one buffer with its segment size,
    which BatchSocket splits again."""
    raw = _udp(sockets, family)
    raw.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    sender = BatchSocket(_udp(sockets, family))
    run = [bytes([i]) * 1200 for i in range(9)] + [b"e" * 500]
    sender.send_batch(run, raw.getsockname())
    data, ancdata, _flags, _source = raw.recvmsg(65535, 64)
    assert data == b"".join(run)
    assert [(kind, struct.unpack("=i", value[:4])[0]) for _, kind, value in ancdata] == [
        (UDP_GRO, 1200)
    ]
    # and without GSO every datagram is a call of its own (loopback coalesces nothing else)
    BatchSocket(sender.sock, gso=False).send_batch(run[:3], raw.getsockname())
    assert [raw.recvmsg(65535, 64)[0] for _ in range(3)] == run[:3]


def test_a_kernel_that_refuses_gso_gets_one_datagram_per_call(sockets: ExitStack) -> None:
    """``SO_NO_CHECK``: the kernel refuses UDP_SEGMENT with EINVAL, as a kernel or device
    without GSO does. Nothing is lost, and GSO is not tried again."""
    sock = _udp(sockets, socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sender = BatchSocket(sock)
    receiver = BatchSocket(_udp(sockets, socket.AF_INET), skip_errors=True)
    datagrams = _datagrams()
    to = receiver.sock.getsockname()
    assert sender.send_batch(datagrams, to) == sum(map(len, datagrams))
    assert (sender.gso, sender.gso_failures, sender.send_drop) == (False, 1, 0)
    sender.send_batch(datagrams, to)
    assert sender.gso_failures == 1  # not tried again
    got = [d for d, _ in receiver.recv_from_batch(2 * len(datagrams))]
    assert got == datagrams + datagrams


def test_a_datagram_too_large_is_refused_with_its_size(sockets: ExitStack) -> None:
    """EMSGSIZE names the datagram's size; the others still go out and GSO stays on."""
    sender = BatchSocket(_udp(sockets, socket.AF_INET))
    receiver = BatchSocket(_udp(sockets, socket.AF_INET), skip_errors=True)
    big = b"x" * 65508  # one more than an IPv4 datagram can carry
    datagrams = [b"a" * 1000, b"b" * 1000, big, b"c" * 1000]
    assert sender.send_batch(datagrams, receiver.sock.getsockname()) == 3000
    assert (sender.refused, sender.send_drop, sender.gso) == ([65508], 1, True)
    assert [d for d, _ in receiver.recv_from_batch()] == [b"a" * 1000, b"b" * 1000, b"c" * 1000]


def test_an_icmp_error_of_a_connected_socket_is_skipped(sockets: ExitStack) -> None:
    """The client's session socket: the server's port closed (ECONNREFUSED on the next read)
    must not hide the datagrams behind it once the server is back."""
    a, b = _udp(sockets, socket.AF_INET), _udp(sockets, socket.AF_INET)
    address = b.getsockname()
    a.connect(address)
    b.close()
    client = BatchSocket(a)
    client.send_batch([b"ping"])  # answered by ICMP port unreachable
    back = _udp_at(sockets, address)
    back.sendto(b"pong", a.getsockname())
    assert list(client.recv_batch()) == [b"pong"]


def _udp_at(stack: ExitStack, address: tuple[str, int]) -> socket.socket:
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind(address)
    return sock


# -- in a network namespace of its own ---------------------------------------------------------

NETNS_SCRIPT = r"""
import json, socket, struct, subprocess
from ostp_sockets import BatchSocket, UDP_GRO, first_hop_payload, set_dont_fragment
subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)
out = {}
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    raw = socket.socket(family, socket.SOCK_DGRAM)
    raw.bind((host, 0))
    raw.setblocking(False)
    raw.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sender = BatchSocket(sock)
    ceiling = first_hop_payload(family, raw.getsockname())
    result = {"df": set_dont_fragment(sock), "ceiling": ceiling}
    # segments one byte over the first hop: each is refused with its size, GSO stays on
    sender.send_batch([b"x" * (ceiling + 1)] * 4, raw.getsockname())
    result["refused"] = list(sender.refused)
    # segments that fit still leave as one GSO run (one coalesced buffer at the reader)
    sender.send_batch([b"y" * ceiling] * 4, raw.getsockname())
    data, anc, _, _ = raw.recvmsg(65535, 64)
    segments = [struct.unpack("=i", v[:4])[0] for _, k, v in anc if k == UDP_GRO]
    result["coalesced"] = [len(data), segments]
    # no route at all: the run is lost like a datagram on the wire, GSO stays on
    far = ("192.0.2.1", 9) if family == socket.AF_INET else ("2001:db8::1", 9)
    sender.send_batch([b"z" * 1000] * 8, far)
    result.update(gso=sender.gso, failures=sender.gso_failures, drops=sender.send_drop)
    out[str(family)] = result
print(json.dumps(out))
"""


@pytest.mark.root
def test_refusals_of_the_path_never_turn_gso_off() -> None:
    """Loopback of MTU 1500 in a namespace with no other route: EMSGSIZE for segments larger
    than the first hop and ENETUNREACH are the datagrams' fate, not a kernel without GSO."""
    unshare = shutil.which("unshare")
    require(
        is_root() and unshare is not None and shutil.which("ip") is not None,
        "needs root, unshare and ip",
    )
    assert unshare is not None
    done = subprocess.run(
        [unshare, "-n", sys.executable, "-c", NETNS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for family, overhead in ((socket.AF_INET, 28), (socket.AF_INET6, 48)):
        got = results[str(family)]
        ceiling = 1500 - overhead
        assert got["df"] and got["ceiling"] == ceiling
        assert got["refused"] == [ceiling + 1] * 4
        assert got["coalesced"] == [4 * ceiling, [ceiling]]
        assert (got["gso"], got["failures"], got["drops"]) == (True, 0, 4 + 8)
