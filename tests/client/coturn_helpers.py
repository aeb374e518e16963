"""A real coturn on loopback for NAT tests: the command line, readiness, start and stop.

The command line is the one ``test_nat_coturn.py`` uses, with the relay address selectable so a
test can tell relayed traffic from direct traffic by its source address.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ostp_client.nat.stun import MessageClass, Method, decode_message, encode_message
from tests.conftest import require

Address = tuple[str, int]
TURNSERVER = shutil.which("turnserver")

NEEDS_COTURN = "needs coturn's turnserver (apt-get install coturn)"
requires_coturn = pytest.mark.requires(TURNSERVER is not None, NEEDS_COTURN)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def coturn_command(port: int, workdir: Path, *extra: str, relay_ip: str = "127.0.0.1") -> list[str]:
    """coturn on 127.0.0.1:port, user u / password p, realm "test", relaying from ``relay_ip``."""
    relay_min = 20000 + (port % 400) * 100
    return [
        TURNSERVER or "turnserver",
        "-n",  # no configuration file
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-rfc5780",
        "--lt-cred-mech",
        "--user",
        "u:p",
        "--realm",
        "test",
        "--listening-ip",
        "127.0.0.1",
        "--relay-ip",
        relay_ip,
        "--listening-port",
        str(port),
        "--min-port",
        str(relay_min),
        "--max-port",
        str(relay_min + 99),
        "--allow-loopback-peers",
        "--fingerprint",
        "--pidfile",
        str(workdir / f"turnserver-{port}.pid"),
        "--log-file",
        str(workdir / f"turn-{port}.log"),
        "--simple-log",
        "--no-stdout-log",
        *extra,
    ]


def answers_binding(server: Address) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        tid = os.urandom(12)
        s.sendto(encode_message(Method.BINDING, MessageClass.REQUEST, tid), server)
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
        return decode_message(data).transaction_id == tid


@dataclass
class Coturn:
    server: Address
    log: Path
    relay_ip: str
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"{self.server[0]}:{self.server[1]}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def running_coturn(workdir: Path, *extra: str, relay_ip: str = "127.0.0.1") -> Iterator[Coturn]:
    """Start coturn on a free loopback port (extra flags as arguments); stop it afterwards."""
    require(TURNSERVER is not None, NEEDS_COTURN)
    for _attempt in range(3):
        port = free_udp_port()
        cmd = coturn_command(port, workdir, *extra, relay_ip=relay_ip)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if answers_binding(("127.0.0.1", port)):
                    break
            else:
                continue
            yield Coturn(("127.0.0.1", port), workdir / f"turn-{port}.log", relay_ip, proc)
            return
        finally:
            _stop(proc)
    pytest.fail("coturn did not come up three times in a row")
