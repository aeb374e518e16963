"""The client's transports side by side: UDP, TCP ``/stream``, WebSocket ``/wss`` and Reality.

Real processes, as users run them: curl → ``ostp-client run`` (a local proxy, the ostp outbound
with ``transport`` udp, tcp, wss or tcp + reality) → ``ostp-server run`` → a local origin
(``tests/client/origin_server.py``). For each transport: MB/s of a download and of an upload
(curl's own figure, best of ``--runs``), and the CPU seconds per GiB moved spent by the client
daemon and by the server (both directions together, from ``/proc``). The goal is TCP ≥ 0.8 x
UDP; the ratios are printed.

    hatch run python bench/transports_bench.py [--mb 200] [--runs 3] [--kinds udp,tcp,wss,reality]

Writes ``bench/results/transports_bench.json``. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    BIN,
    CURL,
    RESULTS,
    cpu_seconds,
    free_port,
    process,
    wait_tcp,
)
from tests.client.tunnel_helpers import free_server_port  # noqa: E402

from ostp_proto.transport import encode_key, generate_keypair  # noqa: E402

GIB = 1 << 30
MB = 1_000_000
SERVER_NAME = "www.example.com"
KINDS = ("udp", "tcp", "wss", "reality")


def curl(args: list[str], metric: str) -> float:
    """Run curl; its ``metric`` (``speed_download``/``speed_upload``) in MB/s."""
    out = subprocess.run(
        [CURL, "-sS", "--noproxy", "", *args, "-o", "/dev/null", "-w", f"%{{{metric}}}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(out.stdout) / MB


def outbound(kind: str, server_port: int, key: str, public: bytes, short_id: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "type": "ostp",
        "tag": "proxy",
        "server": f"127.0.0.1:{server_port}",
        "access_key": key,
        "transport": "tcp" if kind == "reality" else kind,
    }
    if kind == "reality":
        fields["reality"] = {
            "public_key": encode_key(public),
            "short_id": short_id,
            "server_name": SERVER_NAME,
        }
    return fields


def run_kind(
    kind: str,
    args: argparse.Namespace,
    tmp: Path,
    server: subprocess.Popen[bytes],
    server_port: int,
    origin_port: int,
    key: str,
    public: bytes,
    short_id: str,
) -> dict[str, float]:
    proxy_port = free_port()
    config = tmp / f"client-{kind}.json"
    config.write_text(
        json.dumps(
            {
                "log": {"level": "warning"},
                "inbounds": [
                    {"type": "local_proxy", "tag": "in", "listen": "127.0.0.1", "port": proxy_port}
                ],
                "outbounds": [outbound(kind, server_port, key, public, short_id)],
                "routing": {"default_outbound": "proxy"},
                "control": {"socket": ""},
            }
        )
    )
    size = args.mb * MB
    body = tmp / "upload.bin"
    proxy = ["-x", f"socks5h://127.0.0.1:{proxy_port}"]
    base = f"http://127.0.0.1:{origin_port}"
    row: dict[str, float] = {}
    daemon_cmd = [str(BIN / "ostp-client"), "run", "-c", str(config)]
    with process(daemon_cmd, tmp / f"client-{kind}.log") as daemon:
        wait_tcp(proxy_port)
        # the first request waits for the session (up to connect_timeout); not measured
        curl([*proxy, "--retry", "5", "--retry-all-errors", f"{base}/bytes/1000"], "speed_download")
        for direction in ("down", "up"):
            client_cpu, server_cpu = cpu_seconds(daemon.pid), cpu_seconds(server.pid)
            speeds = []
            for _ in range(args.runs):
                if direction == "down":
                    speeds.append(curl([*proxy, f"{base}/bytes/{size}"], "speed_download"))
                else:
                    upload = [*proxy, "--data-binary", f"@{body}", f"{base}/upload"]
                    speeds.append(curl(upload, "speed_upload"))
            moved = size * args.runs
            row[f"{direction}_MBps"] = max(speeds)
            row[f"{direction}_client_cpu_s_per_GiB"] = (
                (cpu_seconds(daemon.pid) - client_cpu) * GIB / moved
            )
            row[f"{direction}_server_cpu_s_per_GiB"] = (
                (cpu_seconds(server.pid) - server_cpu) * GIB / moved
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="MB per transfer")
    parser.add_argument("--runs", type=int, default=3, help="transfers per direction")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", default=str(RESULTS / "transports_bench.json"))
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown transports: {', '.join(sorted(unknown))}")

    tmp = Path(tempfile.mkdtemp(prefix="transports-bench-"))
    (tmp / "upload.bin").write_bytes(os.urandom(args.mb * MB))
    key = secrets.token_hex(16)
    private, public = generate_keypair()
    short_id = secrets.token_hex(8)
    server_port = free_server_port()
    (tmp / "server.json").write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{server_port}",
                "access_keys": [key],
                "log_level": "warning",
                "tcp_rate_limit": 0,
                "reality": {
                    "private_key": encode_key(private),
                    "short_id": short_id,
                    "server_names": [SERVER_NAME],
                },
            }
        )
    )
    origin = [sys.executable, str(ROOT / "tests" / "client" / "origin_server.py")]
    results: dict[str, Any] = {"mb": args.mb, "runs": args.runs}
    server_cmd = [str(BIN / "ostp-server"), "run", "-c", str(tmp / "server.json")]
    with (
        subprocess.Popen(origin, stdout=subprocess.PIPE) as origin_proc,
        process(server_cmd, tmp / "server.log") as server,
    ):
        try:
            assert origin_proc.stdout is not None
            origin_port = int(origin_proc.stdout.readline())
            wait_tcp(server_port)
            time.sleep(0.5)
            for kind in kinds:
                row = run_kind(
                    kind, args, tmp, server, server_port, origin_port, key, public, short_id
                )
                results[kind] = row
                print(
                    f"{kind:8} down {row['down_MBps']:7.1f} MB/s "
                    f"(client {row['down_client_cpu_s_per_GiB']:5.1f}, "
                    f"server {row['down_server_cpu_s_per_GiB']:5.1f} CPU s/GiB)   "
                    f"up {row['up_MBps']:7.1f} MB/s "
                    f"(client {row['up_client_cpu_s_per_GiB']:5.1f}, "
                    f"server {row['up_server_cpu_s_per_GiB']:5.1f})",
                    flush=True,
                )
        finally:
            origin_proc.kill()
    if "udp" in results:
        for kind in KINDS[1:]:
            if kind in results:
                ratio = {
                    d: results[kind][f"{d}_MBps"] / results["udp"][f"{d}_MBps"]
                    for d in ("down", "up")
                }
                results[kind]["vs_udp"] = ratio
                print(f"{kind:8} / udp: down {ratio['down']:.2f}x, up {ratio['up']:.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
