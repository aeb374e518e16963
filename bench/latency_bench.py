"""Latency of a small fetch beside busy streams of the same session, and bulk throughput.

Through ostp-client and ostp-server (each its own process, as users run them) on loopback, to
local origins: the time curl needs for a 1 KB fetch (``time_total``: SOCKS5 handshake, the
tunnel's Connect round trip, request and answer), (a) on an idle session, (b) beside two
``curl --limit-rate 2M`` downloads, (c) beside one full-speed download; then a 100 MB download
alone (best of ``--runs``): MB/s and the CPU seconds client and server spend per GiB. All of it
twice in the same run: with the flow-control extension (the default) and with it disabled on
both sides, the baseline. Prints a table and writes bench/results/latency_bench.json.

    hatch run python bench/latency_bench.py [--fetches 100] [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import BIN, CURL, RESULTS, cpu_seconds, free_port, process, wait_tcp  # noqa: E402

ORIGIN = ROOT / "tests" / "client" / "origin_server.py"
HUGE = 50 * 1024**3  # a body no background download finishes during a measurement


def curl_args(proxy_port: int) -> list[str]:
    return [CURL, "-sS", "--noproxy", "", "-x", f"socks5h://127.0.0.1:{proxy_port}"]


def fetch_latencies(proxy_port: int, url: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        done = subprocess.run(
            [*curl_args(proxy_port), "-o", "/dev/null", "-w", "%{time_total}", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            out.append(float("inf"))  # a failed fetch counts as infinitely slow
            continue
        out.append(float(done.stdout))
    return out


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "failed": sum(1 for v in ordered if v == float("inf")),
    }


@contextmanager
def background(proxy_port: int, url: str, rate: str | None, n: int) -> Iterator[None]:
    procs = []
    limit = ["--limit-rate", rate] if rate else []
    for _ in range(n):
        procs.append(
            subprocess.Popen(
                [*curl_args(proxy_port), *limit, "-o", "/dev/null", url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        time.sleep(2.0)  # let them reach their steady state
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        time.sleep(1.0)  # their streams close at both ends


def write_configs(tmp: Path, proxy_port: int, server_port: int, key: str, ext: bool) -> None:
    (tmp / "server.json").write_text(
        json.dumps({"listen": f"127.0.0.1:{server_port}", "access_keys": [key], "extensions": ext})
    )
    (tmp / "client.json").write_text(
        json.dumps(
            {
                "log": {"level": "warning"},
                "inbounds": [
                    {"type": "local_proxy", "tag": "in", "listen": "127.0.0.1", "port": proxy_port}
                ],
                "outbounds": [
                    {
                        "type": "ostp",
                        "tag": "proxy",
                        "server": f"127.0.0.1:{server_port}",
                        "access_key": key,
                        "extensions": ext,
                    }
                ],
                "routing": {"default_outbound": "proxy"},
            }
        )
    )


def run_mode(
    tmp: Path, origin_port: int, small_port: int, ext: bool, fetches: int, mb: int, runs: int
) -> dict[str, Any]:
    proxy_port, server_port = free_port(), free_port(socket.SOCK_DGRAM)
    key = secrets.token_hex(16)
    write_configs(tmp, proxy_port, server_port, key, ext)
    small = f"http://127.0.0.1:{small_port}/bytes/1000"
    huge = f"http://127.0.0.1:{origin_port}/bytes/{HUGE}"
    result: dict[str, Any] = {}
    server_cmd = [str(BIN / "ostp-server"), "run", "-c", str(tmp / "server.json")]
    client_cmd = [str(BIN / "ostp-client"), "run", "-c", str(tmp / "client.json")]
    with (
        process(server_cmd, tmp / f"server-{ext}.log") as server,
        process(client_cmd, tmp / f"client-{ext}.log") as client,
    ):
        wait_tcp(proxy_port)
        time.sleep(1.5)  # the first handshake
        fetch_latencies(proxy_port, small, 5)  # warm up
        result["a_idle"] = summary(fetch_latencies(proxy_port, small, fetches))
        with background(proxy_port, huge, "2M", 2):
            result["b_beside_two_2MBps_readers"] = summary(
                fetch_latencies(proxy_port, small, fetches)
            )
        with background(proxy_port, huge, None, 1):
            result["c_beside_one_full_speed_download"] = summary(
                fetch_latencies(proxy_port, small, fetches)
            )
        size = mb * 1024 * 1024
        speeds, cpu = [], 0.0
        for _ in range(runs):
            before = cpu_seconds(client.pid) + cpu_seconds(server.pid)
            done = subprocess.run(
                [
                    *curl_args(proxy_port),
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{speed_download} %{size_download}",
                    f"http://127.0.0.1:{origin_port}/bytes/{size}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            cpu += cpu_seconds(client.pid) + cpu_seconds(server.pid) - before
            speed, got = done.stdout.split() if done.stdout else ("0", "0")
            if done.returncode != 0 or int(got) != size:
                print(f"  download failed: curl {done.returncode} {done.stderr.strip()}")
                speed = "0"
            speeds.append(float(speed) / 1e6)
        result["download_MBps_runs"] = speeds
        result["download_MBps"] = max(speeds)
        result["cpu_s_per_GiB"] = cpu / (runs * size / 1024**3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetches", type=int, default=100)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="downloads per mode (best counts)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    results: dict[str, Any] = {}
    origin_cmd = [sys.executable, str(ORIGIN)]
    # Two origins: the small fetches must not wait for the GIL of the one serving the bulk.
    with (
        process(origin_cmd, tmp / "origin.log", stdout=subprocess.PIPE) as origin,
        process(origin_cmd, tmp / "small-origin.log", stdout=subprocess.PIPE) as small,
    ):
        assert origin.stdout is not None and small.stdout is not None
        origin_port = int(origin.stdout.readline())
        small_port = int(small.stdout.readline())
        for name, ext in (("extensions", True), ("baseline_no_extensions", False)):
            results[name] = run_mode(
                tmp, origin_port, small_port, ext, args.fetches, args.mb, args.runs
            )
    print(f"latency_bench: 1 KB fetch through ostp-client + ostp-server, {args.fetches} each")
    header = f"  {'':38}{'median':>9}{'p90':>9}{'max':>9}  (ms)  failed"
    for name, res in results.items():
        print(f" {name}:")
        print(header)
        for case in ("a_idle", "b_beside_two_2MBps_readers", "c_beside_one_full_speed_download"):
            s = res[case]
            print(
                f"  {case:38}{s['median_ms']:9.1f}{s['p90_ms']:9.1f}{s['max_ms']:9.1f}"
                f"        {s['failed']}"
            )
        runs = " ".join(f"{v:.1f}" for v in res["download_MBps_runs"])
        print(
            f"  {args.mb} MB download alone: best {res['download_MBps']:.1f} MB/s ({runs}), "
            f"client+server CPU {res['cpu_s_per_GiB']:.2f} s/GiB"
        )
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_bench.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
