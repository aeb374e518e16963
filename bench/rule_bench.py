"""Rule-set lookups: 100k domains and 100k CIDRs, compiled once, looked up by the router.

Builds a text rule set of `--domains` suffix entries and `--cidrs` IPv4/IPv6 ranges in a temp
directory, loads it as the daemon does (parse + compile), then routes hit and miss queries
through a `Router` whose only rule references the set. Prints compile time, the resident
memory the compiled set added, and the median lookup time per query kind (the goal: at most
5 µs a lookup, independent of the set's size: compare `--domains 1000`).

Writes JSON to bench/results/rule_bench.json.
Usage: ``hatch run python bench/rule_bench.py [--domains 100000] [--cidrs 100000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from ostp_client.config import config_from_data
from ostp_client.flow import Address
from ostp_client.router import Router

RESULTS = Path(__file__).resolve().parent / "results" / "rule_bench.json"


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _label(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--cidrs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = random.Random(1)
    domains = [f"{_label(rng, 8)}.{_label(rng, 5)}.com" for _ in range(args.domains)]
    v4 = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
        for _ in range(args.cidrs // 2)
    ]
    v6 = [
        f"2001:{rng.randrange(65536):x}:{rng.randrange(65536):x}::/48"
        for _ in range(args.cidrs - len(v4))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        path.write_text("\n".join([*domains, *v4, *v6]) + "\n")
        config, _ = config_from_data(
            {
                "outbounds": [{"type": "direct", "tag": "d"}, {"type": "block", "tag": "b"}],
                "routing": {
                    "rule_set": [{"tag": "big", "path": str(path)}],
                    "rules": [{"rule_set": ["big"], "outbound": "b"}],
                    "default_outbound": "d",
                },
            }
        )
        rss_before = _rss_kib()
        started = time.perf_counter()
        router = Router(config.routing, ["d", "b"])
        compile_s = time.perf_counter() - started
        rss_after = _rss_kib()
    queries = {
        "domain hit (subdomain)": [
            Address(f"www.{rng.choice(domains)}", 443) for _ in range(args.queries)
        ],
        "domain miss": [
            Address(f"www.{_label(rng, 8)}.example.org", 443) for _ in range(args.queries)
        ],
        "ipv4 hit": [
            Address(rng.choice(v4).replace("0/24", str(rng.randrange(1, 255))), 443)
            for _ in range(args.queries)
        ],
        "ipv4 miss": [
            Address(f"{rng.randrange(224, 240)}.1.2.3", 443) for _ in range(args.queries)
        ],
        "ipv6 hit": [
            Address(rng.choice(v6).replace("::/48", "::1"), 443) for _ in range(args.queries)
        ],
    }
    expected = {
        "domain hit (subdomain)": "b",
        "domain miss": "d",
        "ipv4 hit": "b",
        "ipv4 miss": "d",
        "ipv6 hit": "b",
    }
    result: dict[str, object] = {
        "domains": args.domains,
        "cidrs": args.cidrs,
        "compile_s": round(compile_s, 3),
        "rss_added_mib": round((rss_after - rss_before) / 1024, 1),
        "lookup_us_median": {},
    }
    print(f"rule set: {args.domains} domains + {args.cidrs} CIDRs")
    print(f"  load + compile: {compile_s:.2f} s, memory +{(rss_after - rss_before) / 1024:.1f} MiB")
    medians: dict[str, float] = {}
    for name, items in queries.items():
        samples = []
        route = router.route
        for address in items:
            t0 = time.perf_counter_ns()
            decision = route(address, "tcp", "in")
            samples.append(time.perf_counter_ns() - t0)
            assert decision.outbound_tag == expected[name], (name, address)
        medians[name] = statistics.median(samples) / 1000
        print(
            f"  {name:24s} median {medians[name]:6.2f} µs  (p99 "
            f"{sorted(samples)[int(len(samples) * 0.99)] / 1000:.2f} µs)"
        )
    result["lookup_us_median"] = medians
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written: {args.json}")


if __name__ == "__main__":
    main()
