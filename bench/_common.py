"""Helpers the process-level benchmarks share: free ports, readiness, child processes, CPU time.

Imported as ``bench._common`` by scripts that put the repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CURL = shutil.which("curl") or "/usr/bin/curl"
RESULTS = ROOT / "bench" / "results"
_TICK = os.sysconf("SC_CLK_TCK")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_tcp(port: int, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(
    args: list[str], log: Path, stdout: int | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with stderr (and stdout, unless ``stdout`` says otherwise, e.g.
    ``subprocess.PIPE``) appended to ``log``, run in ``cwd``; terminated on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out if stdout is None else stdout, stderr=out, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ostp_client_config(
    path: Path, port: int, server_port: int, key: str, mtu: int | None = None, **extra: object
) -> None:
    """An ostp-client config: a local_proxy (SOCKS5/HTTP) inbound, everything to the server.

    ``mtu`` (the outbound's, datagrams up to mtu - 48 bytes) stays the default when None;
    ``extra`` are further keys of the ostp outbound (e.g. ``socket_buffer``).
    """
    outbound: dict[str, object] = {
        "type": "ostp",
        "tag": "proxy",
        "server": f"127.0.0.1:{server_port}",
        "access_key": key,
        **extra,
    }
    if mtu is not None:
        outbound["mtu"] = mtu
    path.write_text(
        json.dumps(
            {
                "log": {"level": "warning"},
                "inbounds": [
                    {"type": "local_proxy", "tag": "in", "listen": "127.0.0.1", "port": port}
                ],
                "outbounds": [outbound],
                "routing": {"default_outbound": "proxy"},
                # no control socket: the default path may belong to another running daemon
                "control": {"socket": ""},
            }
        )
    )
