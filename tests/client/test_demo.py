"""`ostp-client demo` as a newcomer runs it: the printed curl works, `ostp-tui` (no arguments)
finds the daemon at the default control socket, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from ostp_client.control.client import ControlClient
from ostp_client.control.protocol import default_socket_path
from ostp_client.demo import DEMO_PAGE, _control_path
from tests.client.proxy_helpers import CURL, require_curl
from tests.tui.live import short_socket_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``XDG_RUNTIME_DIR``: the default control socket moves there (for the demo too)."""
    directory = short_socket_dir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_until_watch_line(process: subprocess.Popen[str], lines: list[str]) -> None:
    """Collect the demo's stdout up to its last "Try it" line (blocking; run in a thread)."""
    assert process.stdout is not None
    while line := process.stdout.readline():
        lines.append(line.rstrip("\n"))
        if "watch it:" in line:
            return


# `ostp-client demo` whose look at the default socket finds nobody: as when a daemon takes the
# socket between that look and the demo's own bind
LATE_DAEMON = """
import sys
import ostp_client.demo as demo
from ostp_client.cli import main
demo._control_path = lambda workdir: demo.default_socket_path()
sys.exit(main(sys.argv[1:]))
"""


def _start_demo(
    log: Path, program: tuple[str, ...] = ("-m", "ostp_client")
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *program, "demo", "--port", str(_free_tcp_port())],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


async def _try_it(demo: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    with anyio.move_on_after(60):  # (a demo that never says it stays stuck in readline)
        await anyio.to_thread.run_sync(_read_until_watch_line, demo, lines, abandon_on_cancel=True)
    return lines


def _stop(demo: subprocess.Popen[str]) -> None:
    """Ctrl-C (which also stops the demo's ostp-server child), killing only as a last resort."""
    if demo.poll() is None:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    if demo.stdout is not None:
        demo.stdout.close()


async def test_demo_serves_the_default_control_socket(runtime_dir: Path, tmp_path: Path) -> None:
    require_curl()
    path = default_socket_path()
    assert path == str(runtime_dir / "ostp-client" / "control.sock")
    demo = _start_demo(tmp_path / "demo.log")
    try:
        lines = await _try_it(demo)
        assert lines and lines[-1] == "  watch it: ostp-tui", lines  # the last line of "Try it"
        where = next(line for line in lines if "configs in" in line)
        workdir = anyio.Path(where.rsplit("configs in ", 1)[1].rstrip(")"))
        assert await workdir.is_dir()

        # the dashboard's way in: the default socket, no arguments
        async with await ControlClient.connect() as client:
            status = await client.status()
        proxy = next(o for o in status.outbounds if o.id == "proxy")
        assert proxy.state == "connected"

        # the first thing it says to try works as printed
        first_curl = next(line for line in lines if line.strip().startswith("curl -x socks5h"))
        args = shlex.split(first_curl)
        fetched = await anyio.run_process([CURL, "-sS", "--max-time", "30", *args[1:]])
        assert fetched.stdout == DEMO_PAGE

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert await anyio.to_thread.run_sync(lambda: demo.wait(30)) == 0
        assert not await anyio.Path(path).exists()  # the control socket is removed
        assert not await workdir.exists()  # and the demo's configs
    finally:
        _stop(demo)


@pytest.mark.parametrize("late", [False, True], ids=["before", "after-the-look"])
async def test_with_a_daemon_at_the_default_socket_the_demo_names_its_own(
    runtime_dir: Path, tmp_path: Path, late: bool
) -> None:
    default = anyio.Path(default_socket_path())
    await default.parent.mkdir(mode=0o700)
    async with await anyio.create_unix_listener(default):  # "another daemon" listens there
        demo = _start_demo(
            tmp_path / "demo.log", ("-c", LATE_DAEMON) if late else ("-m", "ostp_client")
        )
        try:
            lines = await _try_it(demo)
            assert lines and lines[-1].startswith("  watch it: ostp-tui --socket "), lines
            own = lines[-1].rsplit(" ", 1)[1]
            assert own != str(default)
            async with await ControlClient.connect(own) as client:
                assert "proxy" in {o.id for o in (await client.status()).outbounds}
        finally:
            _stop(demo)
        assert await default.is_socket()  # the other daemon's socket was left alone


def test_a_running_daemon_keeps_the_default_socket(runtime_dir: Path, tmp_path: Path) -> None:
    default = Path(default_socket_path())
    assert _control_path(tmp_path) == str(default)  # nobody serves it: the demo takes it
    default.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(default))
        other.listen()
        # another daemon answers there: the demo uses a socket of its own instead
        assert _control_path(tmp_path) == str(tmp_path / "control.sock")
