"""Benchmark of the reference server: one session's throughput and handshakes per second.

Layout (2 cores): the server runs in its own process (``ostp-server run``), the TCP sink and
source run in a third process, and the client core (``ClientConnection`` on a UDP socket, the
same small driver the server tests use) runs in this process. Each figure is printed next to a
baseline measured in the same run:

* throughput: the same bytes over plain TCP to the same sink/source (what the remote side can
  take), and a plain UDP blast of 1400-byte datagrams, one ``sendto`` per datagram, to a
  counting receiver (the system-call floor of a datagram tunnel);
* handshakes: the bare crypto one responder handshake needs (X25519 key generation + one
  exchange + two ChaCha20-Poly1305 operations), against ``ServerAcceptor.accept`` in memory and
  against full handshakes through the server process over UDP.

Each tunnel transfer also gives the server process's CPU seconds per GiB moved (utime + stime
from ``/proc``): the figure to compare runs by on a shared machine, where MB/s drifts with load.

Usage: ``hatch run python bench/server_bench.py [--mb 100] [--sizes 1400,4096]``.
Writes ``bench/results/server_bench.json``. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ostp_proto import SERVER_DEFAULTS, ClientConnection, ConnectionConfig, ServerAcceptor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import cpu_seconds
from tests.server.tunnel import Tunnel

KEY = os.urandom(16).hex()

RUN_SERVER = "import sys; from ostp_server.cli import main; sys.exit(main(sys.argv[1:]))"

REMOTE = r"""
import socket, struct, sys, threading
def sink(conn):
    need = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))[0]
    got = 0
    while got < need:
        b = conn.recv(1 << 20)
        if not b: break
        got += len(b)
    conn.sendall(b"k"); conn.close()
def source(conn):
    need = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))[0]
    chunk = b"\xab" * (1 << 20)
    while need > 0:
        conn.sendall(chunk[: min(need, len(chunk))]); need -= min(need, len(chunk))
    conn.close()
def udp(sock):
    total = 0
    while True:
        d, a = sock.recvfrom(65535)
        if d == b"END":
            sock.sendto(str(total).encode(), a); total = 0
        else:
            total += len(d)
def serve(ls, fn):
    while True:
        c, _ = ls.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
ports = []
for fn in (sink, source):
    ls = socket.create_server(("127.0.0.1", 0)); ports.append(ls.getsockname()[1])
    threading.Thread(target=serve, args=(ls, fn), daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
u.bind(("127.0.0.1", 0)); ports.append(u.getsockname()[1])
threading.Thread(target=udp, args=(u,), daemon=True).start()
print(*ports, flush=True)
sys.stdin.read()
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, max_datagram_size: int) -> None:
        self.port = free_udp_port()
        self.dir = tempfile.TemporaryDirectory()
        cfg = Path(self.dir.name) / "server.json"
        cfg.write_text(
            json.dumps(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "access_keys": [KEY],
                    "log_level": "warning",
                    "max_datagram_size": max_datagram_size,
                }
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_SERVER, "run", "-c", str(cfg)],
        )
        time.sleep(0.8)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.dir.cleanup()


async def tunnel_transfer(
    server_port: int, target_port: int, n: int, size: int, upload: bool
) -> float:
    t = Tunnel(("127.0.0.1", server_port), KEY, config=ConnectionConfig(max_datagram_size=size))
    async with anyio.create_task_group() as tg:
        await tg.start(t.run)
        sid = await t.open(f"127.0.0.1:{target_port}")
        start = time.perf_counter()
        header = n.to_bytes(8, "big")
        if upload:
            await t.write(sid, header)
            block = os.urandom(1 << 20)
            left = n
            while left:
                piece = block[: min(left, len(block))]
                await t.write(sid, piece)
                left -= len(piece)
            await t.read(sid, 1, limit=120)
        else:
            await t.write(sid, header)
            await t.read(sid, n, limit=120)
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    t.sock.close()
    return n / elapsed / 1e6


def tcp_baseline(port: int, n: int, upload: bool) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(n.to_bytes(8, "big"))
        if upload:
            block = os.urandom(1 << 20)
            left = n
            while left:
                s.sendall(block[: min(left, len(block))])
                left -= min(left, len(block))
            s.recv(1)
        else:
            got = 0
            while got < n:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += len(b)
        return n / (time.perf_counter() - start) / 1e6


def udp_baseline(port: int, n: int) -> tuple[float, float]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    d = os.urandom(1400)
    count = n // 1400
    start = time.perf_counter()
    for _ in range(count):
        s.sendto(d, ("127.0.0.1", port))
    elapsed = time.perf_counter() - start
    time.sleep(0.2)
    s.sendto(b"END", ("127.0.0.1", port))
    s.settimeout(5)
    received = int(s.recv(64))
    s.close()
    return count * 1400 / elapsed / 1e6, received / (count * 1400)


def bare_crypto_handshakes(seconds: float) -> float:
    peer = X25519PrivateKey.generate().public_key().public_bytes_raw()
    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        k = X25519PrivateKey.generate()
        k.exchange(X25519PublicKey.from_public_bytes(peer))
        k.public_key().public_bytes_raw()
        aead.decrypt(nonce, aead.encrypt(nonce, b"p" * 60, b"h"), b"h")
        n += 1
    return n / seconds


def acceptor_handshakes(count: int) -> float:
    acceptor = ServerAcceptor([KEY], config=SERVER_DEFAULTS)
    firsts = []
    for _ in range(count):
        c = ClientConnection(access_key=KEY)
        c.connect(0.0, time.time())
        firsts.append(c.datagrams_to_send(0.0)[0])
    start = time.perf_counter()
    for d in firsts:
        assert acceptor.accept(d, 0.0, time.time()) is not None
    return count / (time.perf_counter() - start)


async def network_handshakes(server_port: int, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        t = Tunnel(("127.0.0.1", server_port), KEY)
        async with anyio.create_task_group() as tg:
            await tg.start(t.run)
            await t.handshake()
            tg.cancel_scope.cancel()
        t.sock.close()
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--sizes", default="1400,4096")
    ap.add_argument("--json", default="bench/results/server_bench.json")
    args = ap.parse_args()
    n = args.mb * 1_000_000
    results: dict[str, Any] = {
        "mb": args.mb,
        "layout": "server process + remote process + client core here",
    }

    remote = subprocess.Popen(
        [sys.executable, "-c", REMOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert remote.stdout is not None
        sink_port, source_port, udp_port = map(int, remote.stdout.readline().split())
        results["tcp_up_MBps"] = tcp_baseline(sink_port, n, True)
        results["tcp_down_MBps"] = tcp_baseline(source_port, n, False)
        rate, delivered = udp_baseline(udp_port, n)
        results["udp_blast_MBps"] = rate
        results["udp_blast_delivered"] = delivered
        tcp_up, tcp_down = results["tcp_up_MBps"], results["tcp_down_MBps"]
        print(f"baseline  raw TCP up {tcp_up:.0f} MB/s, down {tcp_down:.0f} MB/s")
        print(f"baseline  UDP 1400 B, one sendto each: {rate:.0f} MB/s, {delivered:.0%} delivered")
        for size in (int(x) for x in args.sizes.split(",")):
            srv = ServerProcess(size)
            try:
                cpu0 = cpu_seconds(srv.proc.pid)
                up = anyio.run(tunnel_transfer, srv.port, sink_port, n, size, True)
                cpu1 = cpu_seconds(srv.proc.pid)
                down = anyio.run(tunnel_transfer, srv.port, source_port, n, size, False)
                cpu2 = cpu_seconds(srv.proc.pid)
                results[f"tunnel_up_MBps_{size}"] = up
                results[f"tunnel_down_MBps_{size}"] = down
                gib = n / (1 << 30)
                results[f"server_cpu_s_per_GiB_up_{size}"] = cpu_up = (cpu1 - cpu0) / gib
                results[f"server_cpu_s_per_GiB_down_{size}"] = cpu_down = (cpu2 - cpu1) / gib
                print(
                    f"tunnel    datagram {size} B: up {up:.1f} MB/s "
                    f"({up / rate:.0%} of UDP blast, {up / results['tcp_up_MBps']:.1%} of TCP), "
                    f"down {down:.1f} MB/s ({down / rate:.0%} of UDP blast); "
                    f"server CPU s/GiB up {cpu_up:.2f}, down {cpu_down:.2f}"
                )
                if size == 1400:
                    hs = anyio.run(network_handshakes, srv.port, 200)
                    results["handshakes_per_s_network"] = hs
            finally:
                srv.stop()
    finally:
        remote.stdin.close()  # type: ignore[union-attr]
        remote.wait(5)

    bare = bare_crypto_handshakes(1.0)
    acc = acceptor_handshakes(2000)
    results["handshakes_per_s_bare_crypto"] = bare
    results["handshakes_per_s_acceptor"] = acc
    net = results.get("handshakes_per_s_network", 0.0)
    print(f"baseline  bare responder crypto: {bare:.0f} handshakes/s")
    print(f"acceptor  ServerAcceptor.accept in memory: {acc:.0f}/s ({acc / bare:.0%} of bare)")
    print(
        f"network   full handshakes through the server process, one at a time: {net:.0f}/s "
        f"({net / bare:.0%} of bare)"
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
