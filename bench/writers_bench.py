"""Many concurrent writers on one session: aggregate upload MB/s and CPU seconds per GiB.

One ostp-client + ostp-server pair (each its own process, one session, as users run them) on
loopback; ``--writers`` streams at once (1, 16 and 64 by default) upload ``--mb`` MB between
them (200 by default: 12.5 MB each of 16, about 3 MB each of 64) through the SOCKS5 port to a
local sink that counts what arrives and answers with the count (OSTP has no half-close, so the
sink answers after the announced length, not at EOF); every stream must deliver every byte. The
figures: aggregate MB/s over all writers, and CPU seconds per GiB of the client and the server
(utime + stime, all threads; the writers and the sink are not counted). This is where many
writers can share a flush, or each pay their own.

``--transport tcp`` (or ``wss``) runs the session over TCP instead of UDP.

``--baseline DIR`` runs a second pair from another checkout (e.g. a git worktree of main) in
the same rounds, the two taking turns (their order alternates by round) so that the machine's
load hits both alike. ``--count`` runs the clients under ``bench/_send_counter.py``, which
counts the session's ``send_batch`` calls and the datagrams they carry, to show how many
datagrams each call carries (a few Python operations per call; the CPU figures of a ``--count``
run include them for both pairs).

    hatch run python bench/writers_bench.py [--writers 1,16,64] [--mb 200] [--rounds 3]
        [--transport udp] [--baseline /tmp/main-checkout] [--count]

Prints a table and writes bench/results/writers_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    BIN,
    RESULTS,
    cpu_seconds,
    free_port,
    ostp_client_config,
    process,
    wait_tcp,
)
from tests.client.tunnel_helpers import free_server_port  # noqa: E402

GIB = 1 << 30
BLOCK = secrets.token_bytes(1 << 16)  # what each writer sends, again and again
_LENGTH = struct.Struct("!Q")
COUNTER = ROOT / "bench" / "_send_counter.py"


# ------------------------------------------------------------------------------- the sink


async def _sink_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        expected = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
        got = 0
        while got < expected:
            data = await reader.read(1 << 18)
            if not data:
                break
            got += len(data)
        writer.write(_LENGTH.pack(got))
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _sink() -> None:
    server = await asyncio.start_server(_sink_connection, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------- the writers


async def _socks_connect(socks_port: int, port: int) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
    writer.write(b"\x05\x01\x00")
    if await reader.readexactly(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5: no-auth refused")
    writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    head = await reader.readexactly(4)
    if head[1] != 0:
        raise RuntimeError(f"SOCKS5 CONNECT failed: reply {head[1]}")
    atyp = head[3]
    rest = 6 if atyp == 1 else 18 if atyp == 4 else (await reader.readexactly(1))[0] + 2
    await reader.readexactly(rest)
    return reader, writer


async def _upload(reader: Any, writer: Any, size: int, start: asyncio.Event) -> None:
    await start.wait()
    writer.write(_LENGTH.pack(size))
    left = size
    while left:
        n = min(left, len(BLOCK))
        writer.write(BLOCK if n == len(BLOCK) else BLOCK[:n])
        await writer.drain()
        left -= n
    got = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
    writer.close()
    if got != size:
        raise RuntimeError(f"the sink got {got} of {size} bytes")


async def _transfer(socks_port: int, sink_port: int, writers: int, size: int) -> float:
    """Seconds for ``writers`` concurrent uploads of ``size`` bytes each (connected first)."""
    conns = await asyncio.gather(*(_socks_connect(socks_port, sink_port) for _ in range(writers)))
    start = asyncio.Event()
    tasks = [asyncio.create_task(_upload(r, w, size, start)) for r, w in conns]
    await asyncio.sleep(0)
    began = time.perf_counter()
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    return time.perf_counter() - began


# ---------------------------------------------------------------------------- the tunnels


@dataclass
class Pair:
    name: str
    socks_port: int
    client: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    counts: Path | None
    samples: dict[int, list[dict[str, float]]] = field(default_factory=dict)

    def check_alive(self) -> None:
        for side, proc in (("client", self.client), ("server", self.server)):
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the {side} exited with {proc.returncode}")

    def send_counts(self) -> tuple[int, int] | None:
        """The client's (send_batch calls, datagrams) so far (``--count`` only)."""
        if self.counts is None:
            return None
        before = self.counts.stat().st_mtime_ns if self.counts.exists() else 0
        os.kill(self.client.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.counts.exists() and self.counts.stat().st_mtime_ns != before:
                try:
                    data = json.loads(self.counts.read_text())
                except ValueError:
                    continue  # being written
                return int(data["calls"]), int(data["datagrams"])
            time.sleep(0.01)
        raise RuntimeError(f"{self.name}: no send counts from the client")


def start_pair(
    stack: ExitStack, tmp: Path, name: str, checkout: Path | None, count: bool, transport: str
) -> Pair:
    own = tmp / name
    own.mkdir()
    server_port, socks_port = free_server_port(), free_port()  # the server: UDP and TCP
    key = secrets.token_hex(16)
    server_config = {
        "listen": f"127.0.0.1:{server_port}",
        "access_keys": [key],
        "tcp_rate_limit": 0,
    }
    (own / "server.json").write_text(json.dumps(server_config))
    ostp_client_config(own / "client.json", socks_port, server_port, key, transport=transport)
    env_prefix: list[str] = []
    if checkout is not None:
        sources = ":".join(str(p) for p in sorted((checkout / "packages").glob("*/src")))
        env_prefix = ["env", f"PYTHONPATH={sources}"]
    counts = own / "send-counts.json" if count else None
    if counts is not None:
        env_prefix = [*(env_prefix or ["env"]), f"OSTP_SEND_COUNTS={counts}"]
        client_cmd = [*env_prefix, sys.executable, str(COUNTER)]
    elif checkout is not None:
        client_cmd = [*env_prefix, sys.executable, "-m", "ostp_client"]
    else:
        client_cmd = [str(BIN / "ostp-client")]
    server_cmd = (
        [*env_prefix, sys.executable, "-m", "ostp_server"]
        if checkout is not None
        else [str(BIN / "ostp-server")]
    )
    server = stack.enter_context(
        process([*server_cmd, "run", "-c", str(own / "server.json")], own / "server.log")
    )
    client = stack.enter_context(
        process([*client_cmd, "run", "-c", str(own / "client.json")], own / "client.log")
    )
    return Pair(name, socks_port, client, server, counts)


def wait_usable(pair: Pair, sink_port: int, limit: float = 30.0) -> None:
    wait_tcp(pair.socks_port)
    deadline = time.monotonic() + limit
    while True:
        try:
            asyncio.run(_transfer(pair.socks_port, sink_port, 1, 1000))
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(pair: Pair, sink_port: int, writers: int, size: int) -> dict[str, float]:
    pair.check_alive()
    pids = (pair.client.pid, pair.server.pid)
    counts_before = pair.send_counts()
    before = [cpu_seconds(p) for p in pids]
    seconds = asyncio.run(_transfer(pair.socks_port, sink_port, writers, size))
    after = [cpu_seconds(p) for p in pids]
    counts_after = pair.send_counts()
    gib = writers * size / GIB
    client, server = (a - b for a, b in zip(after, before, strict=True))
    result = {
        "MBps": writers * size / seconds / 1e6,
        "client_cpu_s_per_GiB": client / gib,
        "server_cpu_s_per_GiB": server / gib,
    }
    if counts_before is not None and counts_after is not None:
        calls = counts_after[0] - counts_before[0]
        datagrams = counts_after[1] - counts_before[1]
        result["send_batch_calls"] = calls
        result["datagrams_per_send_batch"] = datagrams / max(calls, 1)
    return result


# ------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--writers", default="1,16,64", help="concurrent uploads per run")
    parser.add_argument("--mb", type=int, default=200, help="MB all writers upload together")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--baseline", type=Path, help="another checkout, run in the same rounds")
    parser.add_argument("--transport", default="udp", choices=["udp", "tcp", "wss"])
    parser.add_argument("--count", action="store_true", help="count send_batch calls")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(_sink())
        return 0
    counts = [int(n) for n in args.writers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="writers-bench-"))
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mb": args.mb,
        "rounds": args.rounds,
        "count": args.count,
        "transport": args.transport,
        "baseline": str(args.baseline) if args.baseline is not None else None,
        "cells": {},
    }
    with ExitStack() as stack:
        sink = stack.enter_context(
            process([sys.executable, __file__, "--sink"], tmp / "sink.log", stdout=subprocess.PIPE)
        )
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        pairs = [start_pair(stack, tmp, "ostp", None, args.count, args.transport)]
        if args.baseline is not None:
            base = args.baseline.resolve()
            pairs.append(start_pair(stack, tmp, "ostp-base", base, args.count, args.transport))
        for pair in pairs:
            wait_usable(pair, sink_port)
        for r in range(args.rounds):
            for writers in counts:
                for pair in pairs if r % 2 == 0 else pairs[::-1]:
                    size = args.mb * 1_000_000 // writers
                    sample = measure(pair, sink_port, writers, size)
                    pair.samples.setdefault(writers, []).append(sample)
                    extra = (
                        f" {sample['datagrams_per_send_batch']:6.1f} datagrams/send_batch"
                        if "datagrams_per_send_batch" in sample
                        else ""
                    )
                    print(
                        f"  round {r + 1}/{args.rounds} {writers:3} writers {pair.name:9}"
                        f"{sample['MBps']:8.1f} MB/s client {sample['client_cpu_s_per_GiB']:5.2f}"
                        f" server {sample['server_cpu_s_per_GiB']:5.2f} CPU s/GiB{extra}",
                        file=sys.stderr,
                    )
    for pair in pairs:
        record["cells"][pair.name] = {
            str(n): {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            | {"samples": samples}
            for n, samples in pair.samples.items()
        }
    print_table(record, counts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "writers_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def print_table(record: dict[str, Any], counts: list[int]) -> None:
    print(
        f"\nwriters_bench: concurrent uploads of {record['mb']} MB together through one "
        f"session over {record['transport']}, median of {record['rounds']}"
    )
    head = f"{'writers':>7} {'tunnel':10} {'MB/s':>7} {'client s/GiB':>13} {'server s/GiB':>13}"
    if record["count"]:
        head += f" {'dgrams/send_batch':>18}"
    print(head)
    print("-" * len(head))
    for n in counts:
        for name, cells in record["cells"].items():
            m = cells[str(n)]
            line = (
                f"{n:7} {name:10} {m['MBps']:7.1f} {m['client_cpu_s_per_GiB']:13.2f} "
                f"{m['server_cpu_s_per_GiB']:13.2f}"
            )
            if "datagrams_per_send_batch" in m:
                line += f" {m['datagrams_per_send_batch']:18.1f}"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
