"""Shared helpers for the local-proxy tests: the origin subprocess, a running daemon, curl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ostp_client.config import config_from_data
from ostp_client.daemon import Daemon
from ostp_client.flow import Outbound
from ostp_client.inbounds.proxy.local_proxy import LocalProxyInbound
from tests.conftest import require

CURL = shutil.which("curl") or "/usr/bin/curl"
ORIGIN_SCRIPT = Path(__file__).with_name("origin_server.py")


def require_curl() -> None:
    require(Path(CURL).exists(), "needs curl (apt-get install curl)")


@dataclass
class Origin:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, path: str, host: str = "127.0.0.1", port: int | None = None) -> str:
        return f"http://{host}:{port or self.port}{path}"

    def _open(self, path: str, data: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url(path), data=data)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def log(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._open("/_log")
        return result

    def clear(self) -> None:
        self._open("/_clear", b"")


@contextmanager
def run_origin() -> Iterator[Origin]:
    process = subprocess.Popen([sys.executable, str(ORIGIN_SCRIPT)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("origin server did not start")
        yield Origin(int(line), process)
    finally:
        process.kill()
        process.wait(timeout=10)


@asynccontextmanager
async def running_daemon(
    config: Mapping[str, Any], outbounds: Mapping[str, Outbound] | None = None
) -> AsyncIterator[Daemon]:
    parsed, _ = config_from_data(dict(config))
    daemon = Daemon(parsed, outbounds=outbounds)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


def proxy_port(daemon: Daemon, tag: str = "proxy-in") -> int:
    inbound = daemon.inbounds[tag]
    assert isinstance(inbound, LocalProxyInbound)
    return inbound.addresses[0].port


def proxy_args(mode: str, port: int, user: str | None = None) -> list[str]:
    """curl arguments for one of the four ways to use the proxy."""
    creds = f"{user}@" if user else ""
    if mode == "socks5h":
        return ["-x", f"socks5h://{creds}127.0.0.1:{port}"]
    if mode == "socks5":
        return ["-x", f"socks5://{creds}127.0.0.1:{port}"]
    if mode == "http":
        return ["-x", f"http://{creds}127.0.0.1:{port}"]
    if mode == "connect":
        return ["-p", "-x", f"http://{creds}127.0.0.1:{port}"]
    raise ValueError(mode)


@dataclass
class CurlResult:
    returncode: int
    stdout: str
    stderr: str


async def curl(args: Sequence[str], time_limit: float = 50) -> CurlResult:
    with anyio.fail_after(time_limit):
        done = await anyio.run_process([CURL, "-sS", "--noproxy", "", *args], check=False)
    return CurlResult(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def base_config(**inbound: Any) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0, **inbound}],
        "outbounds": [{"type": "direct", "tag": "direct"}, {"type": "block", "tag": "block"}],
        "routing": {
            "rules": [{"domain_suffix": ["blocked.test"], "outbound": "block"}],
            "default_outbound": "direct",
        },
    }


async def wait_for(predicate: Callable[[], bool], time_limit: float = 10) -> None:
    """Poll `predicate` until it holds (the daemon exposes counters, not events)."""
    with anyio.fail_after(time_limit):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
