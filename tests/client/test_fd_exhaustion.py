"""Out of file descriptors: the daemon delays new connections, keeps the live ones, recovers.

The real `ostp-client run` in a child process whose RLIMIT_NOFILE is small; the test opens more
connections than it has descriptors. Its accept loops must not die (anyio's `Listener.serve`
ends at the first EMFILE from `accept()`, and took the daemon with it).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from ostp_client.flow import Address
from ostp_client.inbounds.proxy.socks5 import encode_address
from tests.client.leak_helpers import fd_count
from tests.client.origin_server import BLOCK
from tests.client.proxy_helpers import CURL, Origin, require_curl, run_origin
from tests.tui.live import program, short_socket_dir

pytestmark = pytest.mark.timeout(120)

NOFILE = 64
WARNING = "cannot accept connections, out of file descriptors"
RECOVERED = "accepting connections again"


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _wait(
    predicate: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    time_limit: float = 30,
) -> None:
    deadline = time.monotonic() + time_limit
    while not predicate():
        assert process.poll() is None, f"the daemon died: {log.read_text()[-3000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _live_connections(control: Path) -> int:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        sock.sendall(b'{"id": 1, "method": "status"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += sock.recv(65536)
    live: int = json.loads(data.split(b"\n")[1])["result"]["connections_live"]
    return live


def _limit_descriptors() -> None:  # runs in the child before exec
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def _socks_connect(port: int, target: Address) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00" + encode_address(target))
    reply = b""
    while len(reply) < 12:
        reply += sock.recv(12 - len(reply))
    assert reply[:4] == b"\x05\x00\x05\x00", reply
    return sock


def _get(sock: socket.socket, size: int) -> bytes:
    sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while not data.endswith(BLOCK[:size]):
        chunk = sock.recv(65536)
        assert chunk, data[:200]
        data += chunk
    return data


def test_running_out_of_descriptors_delays_new_connections_and_recovers(
    origin: Origin, tmp_path: Path
) -> None:
    port = _free_port()
    sock_dir = short_socket_dir()
    control = sock_dir / "control.sock"
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": port, "handshake_timeout": 300}],
                "outbounds": [{"type": "direct"}],
                "control": {"socket": str(control)},
                "log": {"level": "info"},
            }
        )
    )
    log = tmp_path / "daemon.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*program(), "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=_limit_descriptors,  # noqa: PLW1509 (no threads in this test process)
        )
    flood: list[socket.socket] = []
    try:
        _wait(
            lambda: "SOCKS5+HTTP proxy on" in log.read_text(), "the proxy to listen", process, log
        )
        live = _socks_connect(port, Address("127.0.0.1", origin.port))
        assert _get(live, 1000).endswith(BLOCK[:1000])

        for episode in range(2):  # two episodes: the second one logs nothing new
            for _ in range(NOFILE + 40):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            _wait(lambda: fd_count(process.pid) >= NOFILE, "every descriptor in use", process, log)
            _wait(lambda: WARNING in log.read_text(), "the warning", process, log)
            # a control client arriving now waits in the listen queue as well
            waiting = socket.socket(socket.AF_UNIX)
            waiting.settimeout(30)
            waiting.connect(str(control))
            waiting.sendall(b'{"id": 7, "method": "status"}\n')
            assert process.poll() is None, log.read_text()[-3000:]
            # the connection that was live before goes on, with its outbound connection
            assert _get(live, 200_000).endswith(BLOCK[:200_000])

            for sock in flood:
                sock.close()
            flood.clear()
            if episode == 0:
                _wait(lambda: RECOVERED in log.read_text(), "accepting again", process, log)
            answer = b""  # (after the second episode, this answer is the sign of recovery)
            while answer.count(b"\n") < 2:  # hello, then the answer
                answer += waiting.recv(65536)
            waiting.close()
            reply = json.loads(answer.split(b"\n")[1])
            assert reply["id"] == 7 and reply["ok"], reply
            for _ in range(3):
                result = subprocess.run(
                    [CURL, "-sS", "-x", f"socks5h://127.0.0.1:{port}", origin.url("/bytes/5000")],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                assert result.returncode == 0, result.stderr
                assert result.stdout == BLOCK[:5000]
        live.close()
        _wait(lambda: _live_connections(control) == 0, "no live connections", process, log)
        text = log.read_text()
        assert process.poll() is None, text[-3000:]
        assert text.count(WARNING) == 1, text
        assert f"may open {NOFILE}" in text and "LimitNOFILE" in text
        assert "Traceback" not in text, text[-3000:]
    finally:
        for sock in flood:
            sock.close()
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for leftover in sock_dir.iterdir():
            os.unlink(leftover)
        sock_dir.rmdir()
    assert process.returncode == 0, log.read_text()[-3000:]


def test_accept_backoff_warns_once_per_interval_and_says_when_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno
    import logging

    from ostp_client.serving import AcceptBackoff, WarningLimit

    caplog.set_level(logging.DEBUG, logger="ostp_client.serving")
    limit = WarningLimit(60)
    backoff = AcceptBackoff("inbound x", limit)
    other = AcceptBackoff("control socket", limit)
    emfile = OSError(errno.EMFILE, "Too many open files")
    for second in range(5):
        backoff.failed(emfile, now=100.0 + second)
    other.failed(emfile, now=101.0)  # the same shortage seen by another listener: quiet
    backoff.succeeded(now=106.0)
    backoff.failed(emfile, now=110.0)  # a new episode within the interval: quiet
    backoff.succeeded(now=111.0)
    backoff.failed(OSError(errno.ENOBUFS, "No buffer space"), now=200.0)
    levels = [record.levelname for record in caplog.records]
    assert levels == ["WARNING", "DEBUG", "INFO", "DEBUG", "DEBUG", "WARNING"]
    assert "out of file descriptors" in caplog.records[0].getMessage()
    assert "after 6.0 s, 5 failed attempts" in caplog.records[2].getMessage()
    assert "out of memory or socket buffers" in caplog.records[5].getMessage()
    assert backoff.episodes == 3


class _ScriptedListener(anyio.abc.Listener[Any]):
    """accept() raises or returns what the script says, in order."""

    def __init__(self, script: list[object]) -> None:
        self.script = script

    async def accept(self) -> Any:
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def serve(self, handler: Any, task_group: Any = None) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_accept_loop_skips_goes_on_and_stops_only_when_closed() -> None:
    import errno

    from ostp_client.serving import serve_listener

    wrapped = anyio.BrokenResourceError()
    wrapped.__cause__ = OSError(errno.EMFILE, "Too many open files")  # as anyio's Unix listener
    script: list[object] = [
        OSError(errno.ECONNABORTED, "aborted before accept"),
        "first",
        OSError(errno.EMFILE, "Too many open files"),
        wrapped,
        anyio.BrokenResourceError(),  # no cause: unknown, still not fatal
        OSError(errno.EBADF, "unknown"),
        "second",
        anyio.ClosedResourceError(),
    ]
    handled: list[str] = []

    async def handler(stream: Any) -> None:
        handled.append(stream)
        if stream == "first":
            raise RuntimeError("a handler's bug stays in its task")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await serve_listener(_ScriptedListener(script), handler, tg, what="scripted")
    assert handled == ["first", "second"] and script == []
