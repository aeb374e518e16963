"""Our tunnel next to its peers, in one run: MB/s and CPU seconds per GiB, download and upload.

Each tunnel is a SOCKS5 front end and a server, two processes on loopback:

    ostp      ostp-client + ostp-server (this repository, from the hatch env)
    ss-libev  ss-local + ss-server, chacha20-ietf-poly1305 (C)   apt-get install shadowsocks-libev
    v2ray     v2ray vmess, chacha20-poly1305 (Go)                apt-get install v2ray
    pproxy    pproxy socks5 -> pproxy shadowsocks, chacha20-ietf-poly1305 (Python; hatch env)

A peer whose programs are missing is skipped with the command that installs it (benchmarks are
not run by CI, so the test script does not install them).

curl moves ``--mb`` MB through each SOCKS5 front end from and to a local origin
(``tests/client/origin_server.py``: ``GET /bytes/N`` from memory, ``PUT /upload`` counts and
hashes the body, and the benchmark checks both), ``--rounds`` times, the tunnels taking turns in
each round (in reverse order every other round) so that a change in the machine's load hits all
of them alike. The table gives the
median MB/s and the median CPU seconds per GiB of the two tunnel processes (utime + stime from
``/proc/PID/stat``, all threads; curl and the origin are not counted), split by side. CPU per GiB
is the figure to steer by on a shared machine; MB/s depends on what else runs.

``--profile`` then samples ostp-client and ostp-server with py-spy during one download and one
upload of ``--profile-mb`` MB, and writes to bench/results/: the collapsed stacks
(``profile-<dir>-<side>.txt``, for flamegraph.pl or speedscope.app), the same as speedscope JSON
(``.speedscope.json``) and a ranked summary of self and inclusive time per function
(``.top.txt``, also printed).

    hatch run python bench/peers.py [--mb 100] [--rounds 3] [--tunnels ostp,ss-libev] [--profile]

Writes bench/results/peers.json and appends the same record to bench/results/peers-history.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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
    ostp_client_config,
    process,
    wait_tcp,
)
from tests.client.origin_server import body_bytes, body_sha256  # noqa: E402

GIB = 1 << 30
CIPHER = "chacha20-ietf-poly1305"
PASSWORD = "peers-bench-password"


@dataclass
class Running:
    """A started tunnel: its SOCKS5 port and its client and server processes."""

    socks_port: int
    client: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]

    @property
    def client_pid(self) -> int:
        return self.client.pid

    @property
    def server_pid(self) -> int:
        return self.server.pid

    def check_alive(self) -> None:
        for side, proc in (("client", self.client), ("server", self.server)):
            if proc.poll() is not None:
                raise RuntimeError(f"the tunnel's {side} exited with {proc.returncode}")


Starter = Callable[[ExitStack, Path], Running]
OSTP_DATAGRAM: int | None = None  # --ostp-datagram: both sides' largest datagram (UDP payload)


@dataclass
class Tunnel:
    name: str
    label: str
    programs: list[str]
    install: str
    start: Starter
    running: Running | None = None
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def missing(self) -> list[str]:
        return [p for p in self.programs if _which(p) is None]


def _which(program: str) -> str | None:
    local = BIN / program
    return str(local) if local.exists() else shutil.which(program)


def _exe(program: str) -> str:
    path = _which(program)
    assert path is not None, program
    return path


# ------------------------------------------------------------------------------- the tunnels


BASELINE: Path | None = None  # --baseline: a checkout whose ostp packages run as "ostp-base"


def _ostp_command(program: str, baseline: Path | None) -> list[str]:
    """How to start ``ostp-client`` or ``ostp-server``: this checkout's, or the baseline's
    (its sources first on ``PYTHONPATH``; ``env`` execs, so the PID measured is Python's)."""
    if baseline is None:
        return [_exe(program)]
    sources = ":".join(str(p) for p in sorted((baseline / "packages").glob("*/src")))
    module = program.replace("-", "_")
    return ["env", f"PYTHONPATH={sources}", sys.executable, "-m", module]


def start_ostp(stack: ExitStack, tmp: Path, baseline: Path | None = None) -> Running:
    server_port, socks_port = free_port(socket.SOCK_DGRAM), free_port()
    key = secrets.token_hex(16)
    server_config: dict[str, Any] = {"listen": f"127.0.0.1:{server_port}", "access_keys": [key]}
    mtu = None
    if OSTP_DATAGRAM is not None:
        server_config["max_datagram_size"] = OSTP_DATAGRAM
        mtu = OSTP_DATAGRAM + 48  # the client's datagrams are mtu - 48 bytes
    (tmp / "ostp-server.json").write_text(json.dumps(server_config))
    ostp_client_config(tmp / "ostp-client.json", socks_port, server_port, key, mtu)
    server = stack.enter_context(
        process(
            [*_ostp_command("ostp-server", baseline), "run", "-c", str(tmp / "ostp-server.json")],
            tmp / "ostp-server.log",
        )
    )
    client = stack.enter_context(
        process(
            [*_ostp_command("ostp-client", baseline), "run", "-c", str(tmp / "ostp-client.json")],
            tmp / "ostp-client.log",
        )
    )
    return Running(socks_port, client, server)


def start_ostp_base(stack: ExitStack, tmp: Path) -> Running:
    own = tmp / "ostp-base"  # its own config and log files
    own.mkdir(exist_ok=True)
    return start_ostp(stack, own, BASELINE)


def start_ss_libev(stack: ExitStack, tmp: Path) -> Running:
    server_port, socks_port = free_port(), free_port()
    common = ["-k", PASSWORD, "-m", CIPHER, "-s", "127.0.0.1", "-p", str(server_port)]
    server = stack.enter_context(process([_exe("ss-server"), *common], tmp / "ss-server.log"))
    wait_tcp(server_port)
    client = stack.enter_context(
        process(
            [_exe("ss-local"), *common, "-b", "127.0.0.1", "-l", str(socks_port)],
            tmp / "ss-local.log",
        )
    )
    return Running(socks_port, client, server)


def start_v2ray(stack: ExitStack, tmp: Path) -> Running:
    server_port, socks_port = free_port(), free_port()
    user = str(uuid.uuid4())
    log = {"loglevel": "warning"}
    server_config = {
        "log": log,
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": server_port,
                "protocol": "vmess",
                "settings": {"clients": [{"id": user, "alterId": 0}]},
            }
        ],
        "outbounds": [{"protocol": "freedom"}],
    }
    client_config = {
        "log": log,
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": socks_port,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": False},
            }
        ],
        "outbounds": [
            {
                "protocol": "vmess",
                "settings": {
                    "vnext": [
                        {
                            "address": "127.0.0.1",
                            "port": server_port,
                            "users": [{"id": user, "alterId": 0, "security": "chacha20-poly1305"}],
                        }
                    ]
                },
            }
        ],
    }
    (tmp / "v2ray-server.json").write_text(json.dumps(server_config))
    (tmp / "v2ray-client.json").write_text(json.dumps(client_config))
    v2ray = _exe("v2ray")
    server = stack.enter_context(
        process([v2ray, "-config", str(tmp / "v2ray-server.json")], tmp / "v2ray-server.log")
    )
    wait_tcp(server_port)
    client = stack.enter_context(
        process([v2ray, "-config", str(tmp / "v2ray-client.json")], tmp / "v2ray-client.log")
    )
    return Running(socks_port, client, server)


def start_pproxy(stack: ExitStack, tmp: Path) -> Running:
    server_port, socks_port = free_port(), free_port()
    ss = f"ss://{CIPHER}:{PASSWORD}@127.0.0.1:{server_port}"
    pproxy = _exe("pproxy")
    server = stack.enter_context(process([pproxy, "-l", ss], tmp / "pproxy-server.log"))
    wait_tcp(server_port)
    client = stack.enter_context(
        process(
            [pproxy, "-l", f"socks5://127.0.0.1:{socks_port}", "-r", ss],
            tmp / "pproxy-client.log",
        )
    )
    return Running(socks_port, client, server)


def tunnels() -> list[Tunnel]:
    return [
        Tunnel("ostp", "ostp-client + ostp-server", ["ostp-client", "ostp-server"], "", start_ostp),
        Tunnel(
            "ostp-base",
            f"ostp-client + ostp-server of {BASELINE}",
            ["ostp-client", "ostp-server"],
            "--baseline DIR (a checkout of the commit to compare with)",
            start_ostp_base,
        ),
        Tunnel(
            "ss-libev",
            f"shadowsocks-libev ss-local/ss-server, {CIPHER} (C)",
            ["ss-local", "ss-server"],
            "apt-get install shadowsocks-libev",
            start_ss_libev,
        ),
        Tunnel(
            "v2ray",
            "v2ray vmess chacha20-poly1305 (Go)",
            ["v2ray"],
            "apt-get install v2ray",
            start_v2ray,
        ),
        Tunnel(
            "pproxy",
            f"pproxy socks5 -> shadowsocks {CIPHER} (Python)",
            ["pproxy"],
            "hatch env: pip install pproxy pycryptodome",
            start_pproxy,
        ),
    ]


# ------------------------------------------------------------------------------ transfers


@dataclass
class Origin:
    port: int
    upload_file: Path
    size: int
    sha256: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _curl(args: list[str], timeout: float = 600) -> str:
    result = subprocess.run(
        [CURL, "-sS", "--noproxy", "", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"curl {args}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def proxy_args(socks_port: int | None) -> list[str]:
    return [] if socks_port is None else ["-x", f"socks5h://127.0.0.1:{socks_port}"]


def download(origin: Origin, socks_port: int | None, size: int) -> float:
    """Seconds curl took for ``size`` bytes; raises unless all of them arrived."""
    out = _curl(
        [
            *proxy_args(socks_port),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            origin.url(f"/bytes/{size}"),
        ]
    )
    code, got, seconds = out.split()
    if code != "200" or int(got) != size:
        raise RuntimeError(f"download: HTTP {code}, {got} of {size} bytes")
    return float(seconds)


def upload(origin: Origin, socks_port: int | None) -> float:
    """Seconds curl took to PUT the upload file; raises unless the origin got every byte."""
    out = _curl(
        [
            *proxy_args(socks_port),
            "-H",
            "Expect:",
            "-T",
            str(origin.upload_file),
            "-w",
            "\n%{http_code} %{size_upload} %{time_total}",
            origin.url("/upload"),
        ]
    )
    body, status = out.rsplit("\n", 1)
    code, sent, seconds = status.split()
    reply = json.loads(body) if code == "200" else {}
    if reply.get("length") != origin.size or reply.get("sha256") != origin.sha256:
        raise RuntimeError(f"upload: HTTP {code}, sent {sent}, origin saw {reply}")
    return float(seconds)


def wait_usable(origin: Origin, socks_port: int, limit: float = 30.0) -> None:
    """Until a small download through the tunnel works (handshakes, lazy connections)."""
    wait_tcp(socks_port)
    deadline = time.monotonic() + limit
    while True:
        try:
            download(origin, socks_port, 1)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(origin: Origin, running: Running | None, direction: str, size: int) -> dict[str, float]:
    """One transfer: MB/s, and CPU seconds per GiB of the tunnel's processes (total and sides)."""
    pids = [] if running is None else [running.client_pid, running.server_pid]
    if running is not None:
        running.check_alive()
    before = [cpu_seconds(p) for p in pids]
    socks = None if running is None else running.socks_port
    seconds = download(origin, socks, size) if direction == "download" else upload(origin, socks)
    after = [cpu_seconds(p) for p in pids]
    result = {"MBps": size / seconds / 1e6, "seconds": seconds}
    if pids:
        gib = size / GIB
        client, server = (a - b for a, b in zip(after, before, strict=True))
        result |= {
            "cpu_s_per_GiB": (client + server) / gib,
            "client_cpu_s_per_GiB": client / gib,
            "server_cpu_s_per_GiB": server / gib,
        }
    return result


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


# -------------------------------------------------------------------------------- profiles


@contextmanager
def py_spy(pid: int, out: Path, rate: int) -> Iterator[None]:
    """py-spy samples ``pid`` while the block runs; collapsed stacks go to ``out``."""
    cmd = [_exe("py-spy"), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    proc = subprocess.Popen(
        [*cmd, "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "py-spy> Sampling process ..." once it is attached
    if "Sampling" not in line:
        proc.kill()
        raise RuntimeError(f"py-spy did not attach to {pid}: {line}{proc.stdout.read()}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``; shortens paths to the package."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


# Leaves where a thread waits: py-spy (without OS thread ids) reports such threads as active,
# so they are left out of the shares (idle worker threads, the event loop's wait).
IDLE_LEAVES = (
    "Condition.wait (threading.py)",
    "_worker (concurrent/futures/thread.py)",
    "DaemonThreadPool._work (ostp_client/executor.py)",  # its idle workers wait in a queue
    "EpollSelector.select (selectors.py)",
)


def summarize(collapsed: Path, title: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function, ranked, from py-spy's collapsed stacks.

    Shares are of the samples not waiting (see IDLE_LEAVES); on a loaded machine a runnable
    thread that waits for a core is sampled as busy too, so they are shares of busy-or-runnable
    time, which spreads over functions as CPU time does.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")]
        if not frames or frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{title}: {total} busy samples ({idle} waiting, left out)"]
    for heading, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"  {heading}:")
        for name, count in counter.most_common(top):
            lines.append(f"    {100 * count / max(total, 1):5.1f} %  {name}")
    return "\n".join(lines)


def speedscope(collapsed: Path, out: Path, name: str) -> None:
    """The collapsed stacks as a speedscope "sampled" profile (one file, opens offline)."""
    frames: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        samples.append([frames.setdefault(f, len(frames)) for f in stack.split(";")])
        weights.append(int(count_text))
    doc: dict[str, Any] = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": f} for f in frames]},
        "profiles": [
            {
                "type": "sampled",
                "name": name,
                "unit": "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
        "exporter": "bench/peers.py",
    }
    out.write_text(json.dumps(doc))


def profile_ostp(origin: Origin, running: Running, size: int, rate: int) -> dict[str, str]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, str] = {}
    for direction in ("download", "upload"):
        paths = {side: RESULTS / f"profile-{direction}-{side}.txt" for side in ("client", "server")}
        with (
            py_spy(running.client_pid, paths["client"], rate),
            py_spy(running.server_pid, paths["server"], rate),
        ):
            result = measure(origin, running, direction, size)
        for side, path in paths.items():
            title = (
                f"ostp-{side}, {direction} of {size / 1e6:.0f} MB "
                f"({result['MBps']:.0f} MB/s while sampled at {rate} Hz)"
            )
            text = summarize(path, title)
            path.with_suffix(".top.txt").write_text(text + "\n")
            speedscope(path, path.with_suffix(".speedscope.json"), title)
            summaries[f"{direction}-{side}"] = text
            print(text)
    return summaries


# ------------------------------------------------------------------------------------ main


def _git_commit() -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown"
    result = subprocess.run(
        [git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="MB per transfer (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per cell (median)")
    parser.add_argument("--tunnels", default="ostp,ss-libev,v2ray,pproxy")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of ostp")
    parser.add_argument("--profile-mb", type=int, default=300)
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per s")
    parser.add_argument(
        "--ostp-datagram",
        type=int,
        help="largest ostp datagram both ways (default: path MTU discovery, up to 64 KB on "
        "loopback; a --baseline before it: server 4200, client 1302); 1452 is what fits a "
        "1500-byte IPv6 path",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of main) run as the tunnel ostp-base, "
        "in the same rounds as ours",
    )
    args = parser.parse_args()
    global OSTP_DATAGRAM, BASELINE
    OSTP_DATAGRAM = args.ostp_datagram
    BASELINE = args.baseline.resolve() if args.baseline is not None else None
    if BASELINE is not None and "ostp-base" not in args.tunnels.split(","):
        args.tunnels += ",ostp-base"

    wanted = args.tunnels.split(",")
    chosen = [t for t in tunnels() if t.name in wanted]
    unknown = set(wanted) - {t.name for t in chosen}
    if unknown:
        parser.error(f"unknown tunnels: {', '.join(sorted(unknown))}")
    if args.profile and "ostp" not in wanted:
        parser.error("--profile needs the ostp tunnel")
    if args.profile and _which("py-spy") is None:
        parser.error("--profile needs py-spy (it is in the hatch env: hatch run ...)")
    skipped: dict[str, str] = {}
    for t in list(chosen):
        missing = t.missing()
        if missing:
            skipped[t.name] = f"missing {', '.join(missing)}: {t.install}"
            print(f"peers: skipping {t.name}: {skipped[t.name]}", file=sys.stderr)
            chosen.remove(t)

    size = args.mb * 1_000_000
    tmp = Path(tempfile.mkdtemp(prefix="peers-bench-"))
    upload_file = tmp / "upload.bin"
    upload_file.write_bytes(body_bytes(size))
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "mb": args.mb,
        "rounds": args.rounds,
        "ostp_datagram": args.ostp_datagram,
        "skipped": skipped,
        "tunnels": {},
    }
    direct: dict[str, list[dict[str, float]]] = {"download": [], "upload": []}
    failed = True
    try:
        with ExitStack() as stack:
            origin_proc = stack.enter_context(_origin(tmp))
            assert origin_proc.stdout is not None
            origin = Origin(
                int(origin_proc.stdout.readline()), upload_file, size, body_sha256(size)
            )
            for t in chosen:
                t.running = t.start(stack, tmp)
            for t in chosen:
                assert t.running is not None
                wait_usable(origin, t.running.socks_port)
            for r in range(args.rounds):
                # every other round in reverse order: a tunnel measured always first (or right
                # after the direct transfer) would meet the machine's load changes differently
                turn = chosen if r % 2 == 0 else chosen[::-1]
                for direction in ("download", "upload"):
                    direct[direction].append(measure(origin, None, direction, size))
                    for t in turn:
                        sample = measure(origin, t.running, direction, size)
                        t.samples.setdefault(direction, []).append(sample)
                        print(
                            f"  round {r + 1}/{args.rounds} {direction:8} {t.name:9}"
                            f"{sample['MBps']:8.1f} MB/s {sample['cpu_s_per_GiB']:6.2f} CPU s/GiB",
                            file=sys.stderr,
                        )
            record["direct"] = {d: median_of(s) for d, s in direct.items()}
            for t in chosen:
                record["tunnels"][t.name] = {
                    "label": t.label,
                    **{d: median_of(s) for d, s in t.samples.items()},
                    "samples": t.samples,
                }
            print_table(record)
            ostp = next((t for t in chosen if t.name == "ostp"), None)
            if args.profile and ostp is not None and ostp.running is not None:
                record["profiles"] = profile_ostp(
                    origin, ostp.running, args.profile_mb * 1_000_000, args.profile_rate
                )
        failed = False
    finally:
        if failed:
            print(f"peers: failed; the tunnels' logs are in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps(record, indent=2) + "\n")
    with (RESULTS / "peers-history.jsonl").open("a") as history:
        history.write(json.dumps(record) + "\n")
    return 0


@contextmanager
def _origin(tmp: Path) -> Iterator[subprocess.Popen[str]]:
    script = ROOT / "tests" / "client" / "origin_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=(tmp / "origin.log").open("ab"),
        text=True,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def print_table(record: dict[str, Any]) -> None:
    print(
        f"\npeers: {record['mb']} MB per transfer through SOCKS5 on loopback, "
        f"median of {record['rounds']}, {record['cpus']} CPUs, commit {record['commit']}"
    )
    print("CPU s/GiB counts both tunnel processes (client + server), not curl or the origin.")
    size = record.get("ostp_datagram")
    sizes = (
        f"{size} bytes both ways"
        if size
        else (
            "the defaults (path MTU discovery: up to 64 KB on loopback; before it 4,200 down, "
            "1,302 up)"
        )
    )
    print(f"ostp datagrams (UDP payload): {sizes}")
    head = (
        f"{'tunnel':48} {'dir':8} {'MB/s':>7} {'CPU s/GiB':>10} {'client':>7} {'server':>7} "
        f"{'x ss-libev':>10}"
    )
    print(head)
    print("-" * len(head))
    ss = record["tunnels"].get("ss-libev")
    for direction in ("download", "upload"):
        d = record["direct"][direction]
        print(f"{'direct (no tunnel)':48} {direction:8} {d['MBps']:7.0f} {'-':>10}")
        for t in record["tunnels"].values():
            m = t[direction]
            ratio = f"{m['cpu_s_per_GiB'] / ss[direction]['cpu_s_per_GiB']:.2f}" if ss else "-"
            print(
                f"{t['label'][:48]:48} {direction:8} {m['MBps']:7.0f} {m['cpu_s_per_GiB']:10.2f} "
                f"{m['client_cpu_s_per_GiB']:7.2f} {m['server_cpu_s_per_GiB']:7.2f} {ratio:>10}"
            )
    for name, reason in record["skipped"].items():
        print(f"skipped {name}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
