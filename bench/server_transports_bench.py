"""The server's transports side by side: UDP, TCP ``/stream``, WebSocket ``/wss`` and Reality.

Layout (2 cores): the server runs in its own process (``ostp-server run``), the TCP sink and
source in a third process (the same as ``server_bench.py``), and the client core here: the UDP
``Tunnel`` of the server tests, or the ``TcpTunnel`` built from ``ostp_proto.transport``.
For each transport: MB/s up (client → remote) and down, and the CPU seconds per GiB spent by the
server process and by this client process. The client is Python too, so on 2 cores the figures
are a ceiling for neither side; the ratios between transports are what this measures.

Usage: ``hatch run python bench/server_transports_bench.py [--mb 100]``.
Writes ``bench/results/server_transports_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from ostp_proto import ConnectionConfig
from ostp_proto.transport import Framing, RealityClient, encode_key, generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_bench import REMOTE, RUN_SERVER, free_udp_port
from tests.server.tcp_tunnel import TcpTunnel
from tests.server.tunnel import Tunnel

KEY = os.urandom(16).hex()
PRIVATE, PUBLIC = generate_keypair()
SHORT_ID = os.urandom(8)
SNI = "www.example.com"
GIB = 1 << 30


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    def __init__(self) -> None:
        self.port = free_udp_port()
        self.dir = tempfile.TemporaryDirectory()
        cfg = Path(self.dir.name) / "server.json"
        cfg.write_text(
            json.dumps(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "access_keys": [KEY],
                    "log_level": "warning",
                    "tcp_rate_limit": 0,
                    "reality": {
                        "private_key": encode_key(PRIVATE),
                        "short_id": SHORT_ID.hex(),
                        "server_names": [SNI],
                    },
                }
            )
        )
        self.proc = subprocess.Popen([sys.executable, "-c", RUN_SERVER, "run", "-c", str(cfg)])
        time.sleep(1.0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.dir.cleanup()


def make_tunnel(kind: str, port: int, size: int) -> Tunnel | TcpTunnel:
    addr = ("127.0.0.1", port)
    config = ConnectionConfig(max_datagram_size=size)
    if kind == "udp":
        return Tunnel(addr, KEY, config=config)
    framing = Framing.WSS if kind == "wss" else Framing.STREAM
    reality = None
    if kind == "reality":
        reality = RealityClient(server_public=PUBLIC, short_id=SHORT_ID, sni=SNI)
    return TcpTunnel(addr, KEY, framing, reality=reality, config=config)


async def transfer(
    kind: str, server_port: int, target_port: int, n: int, upload: bool, size: int
) -> float:
    t = make_tunnel(kind, server_port, size)
    async with anyio.create_task_group() as tg:
        await tg.start(t.run)
        sid = await t.open(f"127.0.0.1:{target_port}")
        start = time.perf_counter()
        await t.write(sid, n.to_bytes(8, "big"))
        if upload:
            block = os.urandom(1 << 20)
            left = n
            while left:
                piece = block[: min(left, len(block))]
                await t.write(sid, piece)
                left -= len(piece)
            await t.read(sid, 1, limit=300)
        else:
            await t.read(sid, n, limit=300)
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    if isinstance(t, Tunnel):
        t.sock.close()
    else:
        await t.aclose()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--kinds", default="udp,tcp,wss,reality")
    ap.add_argument("--size", type=int, default=4096, help="client datagram size")
    ap.add_argument("--json", default="bench/results/server_transports_bench.json")
    args = ap.parse_args()
    n = args.mb * 1_000_000
    results: dict[str, Any] = {"mb": args.mb, "client_datagram_size": args.size}
    remote = subprocess.Popen(
        [sys.executable, "-c", REMOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    srv = ServerProcess()
    try:
        assert remote.stdout is not None
        sink_port, source_port, _udp = map(int, remote.stdout.readline().split())
        for kind in args.kinds.split(","):
            row: dict[str, float] = {}
            for direction, target in (("up", sink_port), ("down", source_port)):
                server_cpu = cpu_seconds(srv.proc.pid)
                client_cpu = time.process_time()
                elapsed = anyio.run(
                    transfer, kind, srv.port, target, n, direction == "up", args.size
                )
                server_cpu = cpu_seconds(srv.proc.pid) - server_cpu
                client_cpu = time.process_time() - client_cpu
                row[f"{direction}_MBps"] = n / elapsed / 1e6
                row[f"{direction}_server_cpu_s_per_GiB"] = server_cpu * GIB / n
                row[f"{direction}_client_cpu_s_per_GiB"] = client_cpu * GIB / n
            results[kind] = row
            print(
                f"{kind:8} up {row['up_MBps']:6.1f} MB/s "
                f"(server {row['up_server_cpu_s_per_GiB']:5.1f} CPU s/GiB, "
                f"client {row['up_client_cpu_s_per_GiB']:5.1f}), "
                f"down {row['down_MBps']:6.1f} MB/s "
                f"(server {row['down_server_cpu_s_per_GiB']:5.1f}, "
                f"client {row['down_client_cpu_s_per_GiB']:5.1f})"
            )
        if "udp" in results:
            for kind in ("tcp", "wss", "reality"):
                if kind in results:
                    ratio = {
                        d: results[kind][f"{d}_MBps"] / results["udp"][f"{d}_MBps"]
                        for d in ("up", "down")
                    }
                    results[kind]["vs_udp"] = ratio
                    print(f"{kind:8} vs udp: up {ratio['up']:.2f}x, down {ratio['down']:.2f}x")
    finally:
        srv.stop()
        remote.stdin.close()  # type: ignore[union-attr]
        remote.wait(5)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
