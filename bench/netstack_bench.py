"""Single-stream download through TUN → netstack → `direct`, next to the kernel's own path.

For each TUN MTU (1500, 9000, 65520) two namespaces are created (see `tests/client/tun_netns.py`):
curl in the client namespace downloads from the origin in the server namespace
1. through the TUN: curl → 203.0.113.10 (routed only into the TUN) → the daemon's netstack →
   `direct` outbound → veth → origin;
2. over the veth pair alone: curl → 192.0.2.2 → origin (the kernel's path).
The veth MTU equals the TUN MTU. Prints MB/s and the ratio, and writes JSON to bench/results/.
Needs root. Usage: `hatch run python bench/netstack_bench.py [--size-mb 64] [--repeat 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.client.tun_netns import ORIGIN_V4, SERVER_V4, Namespaces  # noqa: E402

MTUS = (1500, 9000, 65520)
TUN = "ostpb0"


def _download(ns: Namespaces, url: str, expected: int) -> float:
    out = ns.exec(
        ns.client,
        "curl", "-sS", "--max-time", "120", "-o", "/dev/null",
        "-w", "%{http_code} %{size_download} %{speed_download}", url,
    )  # fmt: skip
    code, size, speed = out.split()
    if code != "200" or int(size) != expected:
        raise RuntimeError(f"{url}: HTTP {code}, {size} bytes")
    return float(speed) / 1e6


def measure(mtu: int, size: int, repeat: int, offload: bool) -> dict[str, object]:
    ns = Namespaces(mtu=mtu)
    ns.setup()
    try:
        port = ns.start_origin()
        with TemporaryDirectory() as tmp:
            config = {
                "log": {"level": "warning"},
                "control": {"socket": f"{tmp}/ctl.sock"},
                "inbounds": [
                    {"type": "tun", "name": TUN, "mtu": mtu, "dns_hijack": False,
                     "offload": offload}
                ],
                "outbounds": [{"type": "direct", "tag": "direct", "override_address": SERVER_V4}],
            }  # fmt: skip
            path = Path(tmp) / "client.json"
            path.write_text(json.dumps(config))
            daemon = ns.start_daemon(path, TUN, Path(tmp) / "daemon.log")
            try:
                tun = [
                    _download(ns, f"http://{ORIGIN_V4}:{port}/bytes/{size}", size)
                    for _ in range(repeat)
                ]
                veth = [
                    _download(ns, f"http://{SERVER_V4}:{port}/bytes/{size}", size)
                    for _ in range(repeat)
                ]
            finally:
                ns.stop(daemon)
    finally:
        ns.teardown()
    best_tun, best_veth = max(tun), max(veth)
    return {
        "mtu": mtu,
        "offload": offload,
        "tun_mb_s": round(best_tun, 1),
        "veth_mb_s": round(best_veth, 1),
        "ratio": round(best_tun / best_veth, 3),
        "tun_runs": [round(x, 1) for x in tun],
        "veth_runs": [round(x, 1) for x in veth],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="bytes per download, in MB")
    parser.add_argument("--repeat", type=int, default=2, help="downloads per path (best counts)")
    parser.add_argument("--mtu", type=int, action="append", help="TUN MTU (repeatable)")
    parser.add_argument("--no-offload", action="store_true", help="without IFF_VNET_HDR")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces and a TUN device)", file=sys.stderr)
        return 2
    size = args.size_mb * 1_000_000
    results = []
    print(f"{'MTU':>6} {'TUN MB/s':>9} {'veth MB/s':>10} {'ratio':>6}")
    for mtu in args.mtu or MTUS:
        row = measure(mtu, size, args.repeat, not args.no_offload)
        results.append(row)
        print(f"{mtu:>6} {row['tun_mb_s']:>9} {row['veth_mb_s']:>10} {row['ratio']:>6}", flush=True)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (
        "netstack_bench.json" if not args.no_offload else "netstack_bench_no_offload.json"
    )
    out.write_text(
        json.dumps(
            {
                "bench": "netstack_bench",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "size_bytes": size,
                "repeat": args.repeat,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
