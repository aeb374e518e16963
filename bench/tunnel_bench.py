"""Bulk download through the tunnel next to its baselines, in one run.

(a) curl straight from a local origin, (b) curl through ostp-client and ostp-server (each its
own process, as users run them), (c) curl through pproxy's SOCKS5 front end chained to a pproxy
shadowsocks server (chacha20-ietf-poly1305), and (b) again through a relay that drops 2 % of
datagrams. Prints MB/s and the ratios b/a and b/c; then the resident memory of the idle daemon
and with 1,000 open streams. Writes bench/results/tunnel_bench.json.

    hatch run python bench/tunnel_bench.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    BIN,
    CURL,
    free_port,
    ostp_client_config,
    process,
    rss_mb,
    wait_tcp,
)


def curl_speed(url: str, proxy: list[str]) -> float:
    out = subprocess.run(
        [CURL, "-sS", "--noproxy", "", *proxy, "-o", "/dev/null", "-w", "%{speed_download}", url],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(out.stdout) / 1e6


def best(url: str, proxy: list[str], runs: int) -> float:
    return max(curl_speed(url, proxy) for _ in range(runs))


async def hold_streams(proxy_port: int, target_port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(b"\x05\x01\x00")
        await reader.readexactly(2)
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target_port.to_bytes(2, "big"))
        reply = await reader.readexactly(10)
        assert reply[1] == 0, reply
        writers.append(writer)
    return writers


def memory(tmp: Path, server_port: int, key: str) -> dict[str, float]:
    port = free_port()
    config = tmp / "mem-client.json"
    ostp_client_config(config, port, server_port, key)
    sink_port = free_port()
    result: dict[str, float] = {}

    async def main(pid: int) -> None:
        held: list[asyncio.StreamWriter] = []

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            with suppress(asyncio.CancelledError, ConnectionError):
                await reader.read()

        server = await asyncio.start_server(sink, "127.0.0.1", sink_port, backlog=2048)
        await asyncio.sleep(2.0)
        result["idle_rss_mb"] = rss_mb(pid)
        writers = await hold_streams(port, sink_port, 1000)
        await asyncio.sleep(1.0)
        result["rss_1000_streams_mb"] = rss_mb(pid)
        result["added_by_1000_streams_mb"] = result["rss_1000_streams_mb"] - result["idle_rss_mb"]
        for w in writers + held:
            w.close()
        server.close()

    with process([str(BIN / "ostp-client"), "run", "-c", str(config)], tmp / "mem.log") as proc:
        wait_tcp(port)
        asyncio.run(main(proc.pid))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from tests.client.tunnel_helpers import LossyRelay

    tmp = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    (tmp / "www").mkdir()
    (tmp / "www" / "body").write_bytes(os.urandom(args.mb * 1024 * 1024))
    origin_port, server_port = free_port(), free_port(socket.SOCK_DGRAM)
    proxy_port, ss_port, pp_port, lossy_proxy_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    key = secrets.token_hex(16)
    (tmp / "server.json").write_text(
        json.dumps({"listen": f"127.0.0.1:{server_port}", "access_keys": [key]})
    )
    ostp_client_config(tmp / "client.json", proxy_port, server_port, key)
    url = f"http://127.0.0.1:{origin_port}/body"
    results: dict[str, float] = {}
    origin_cmd = [sys.executable, "-m", "http.server", str(origin_port), "--bind", "127.0.0.1"]
    with (
        process([*origin_cmd, "--directory", str(tmp / "www")], tmp / "origin.log"),
        process([str(BIN / "ostp-server"), "run", "-c", str(tmp / "server.json")], tmp / "s.log"),
    ):
        wait_tcp(origin_port)
        results["a_direct_MBps"] = best(url, [], args.runs)
        with process(
            [str(BIN / "ostp-client"), "run", "-c", str(tmp / "client.json")], tmp / "c.log"
        ):
            wait_tcp(proxy_port)
            time.sleep(1.5)  # first handshake
            results["b_ostp_MBps"] = best(
                url, ["-x", f"socks5h://127.0.0.1:{proxy_port}"], args.runs
            )
        cipher = "chacha20-ietf-poly1305:benchpass"
        ss_cmd = [str(BIN / "pproxy"), "-l", f"ss://{cipher}@127.0.0.1:{ss_port}"]
        socks_cmd = [
            str(BIN / "pproxy"),
            "-l",
            f"socks5://127.0.0.1:{pp_port}",
            "-r",
            f"ss://{cipher}@127.0.0.1:{ss_port}",
        ]
        with process(ss_cmd, tmp / "ss.log"), process(socks_cmd, tmp / "pp.log"):
            wait_tcp(ss_port)
            wait_tcp(pp_port)
            results["c_pproxy_ss_MBps"] = best(
                url, ["-x", f"socks5h://127.0.0.1:{pp_port}"], args.runs
            )
        faults = {
            "b_ostp_relay_no_loss_MBps": (0.0, 0.0, 0.0),
            "b_ostp_2pct_loss_MBps": (0.02, 0.0, 0.0),
            "b_ostp_3pct_loss_dup_reorder_MBps": (0.03, 0.01, 0.05),
        }
        for name, (loss, dup, reorder) in faults.items():
            with LossyRelay(server_port, loss, duplicate=dup, reorder=reorder) as relay:
                ostp_client_config(tmp / "lossy.json", lossy_proxy_port, relay.port, key)
                lossy_cmd = [str(BIN / "ostp-client"), "run", "-c", str(tmp / "lossy.json")]
                with process(lossy_cmd, tmp / "l.log"):
                    wait_tcp(lossy_proxy_port)
                    time.sleep(1.5)
                    lossy = ["-x", f"socks5h://127.0.0.1:{lossy_proxy_port}"]
                    results[name] = curl_speed(url, lossy)
        results.update(memory(tmp, server_port, key))
    results["b_over_a"] = results["b_ostp_MBps"] / results["a_direct_MBps"]
    results["b_over_c"] = results["b_ostp_MBps"] / results["c_pproxy_ss_MBps"]
    no_loss = results["b_ostp_relay_no_loss_MBps"]
    results["b_2pct_over_relay"] = results["b_ostp_2pct_loss_MBps"] / no_loss
    results["b_3pct_dup_reorder_over_relay"] = (
        results["b_ostp_3pct_loss_dup_reorder_MBps"] / no_loss
    )
    print(f"tunnel_bench: {args.mb} MB download with curl, best of {args.runs}")
    print("  (the lossy runs pass a relay in a Python thread; it caps their speed, so their")
    print("   ratios are taken against the same relay without loss)")
    print(f"  (a) direct from the origin          {results['a_direct_MBps']:9.1f} MB/s")
    print(f"  (b) ostp-client + ostp-server       {results['b_ostp_MBps']:9.1f} MB/s")
    print(f"  (c) pproxy socks5 -> shadowsocks    {results['c_pproxy_ss_MBps']:9.1f} MB/s")
    print(f"  (b) via the relay, no loss          {no_loss:9.1f} MB/s")
    print(f"  (b) via the relay, 2 % loss         {results['b_ostp_2pct_loss_MBps']:9.1f} MB/s")
    print(
        "  (b) relay, 3 % loss 1 % dup 5 % reord"
        f"{results['b_ostp_3pct_loss_dup_reorder_MBps']:9.1f} MB/s"
    )
    print(
        f"  ratios: b/a {results['b_over_a']:.3f}   b/c {results['b_over_c']:.2f}   "
        f"2 %/no loss {results['b_2pct_over_relay']:.2f}   "
        f"3 %+dup+reorder/no loss {results['b_3pct_dup_reorder_over_relay']:.2f}"
    )
    print(
        f"  memory: idle daemon {results['idle_rss_mb']:.1f} MB RSS, with 1,000 streams "
        f"{results['rss_1000_streams_mb']:.1f} MB (+{results['added_by_1000_streams_mb']:.1f} MB)"
    )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tunnel_bench.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
