"""Crash safety with real processes: SIGTERM/SIGINT restore exactly; after SIGKILL the next
start restores. Uses the daemon glue (``SystemProxyGuard``) in a small real process."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ostp_client.sysproxy import SystemProxy

from .sysproxy_fakes import (
    GSETTINGS_KEYFILE,
    KIOSLAVERC,
    customise_gnome,
    customise_kde,
    isolated_env,
    read_ini,
    require_tools,
)

pytestmark = pytest.mark.timeout(60)

DAEMON = """
import signal, sys
from pathlib import Path
import anyio
from ostp_client.sysproxy import SystemProxy, SystemProxyGuard

async def main() -> None:
    proxy = SystemProxy.for_this_system(sys.argv[1], state_path=Path(sys.argv[2]))
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with SystemProxyGuard(proxy, "127.0.0.1", 1088):
            print("ready", flush=True)
            async for _ in signals:
                break
    print("restored", flush=True)

anyio.run(main)
"""

RECOVER = """
import sys
from pathlib import Path
from ostp_client.sysproxy import SystemProxy

proxy = SystemProxy.for_this_system(sys.argv[1], state_path=Path(sys.argv[2]))
print("recovered" if proxy.recover_stale() else "nothing", flush=True)
"""


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("child process did not answer")
    return proc.stdout.readline().strip()


def settings_files(tmp: Path) -> dict[str, dict[str, dict[str, str]]]:
    return {
        "gsettings": read_ini(tmp.joinpath(*GSETTINGS_KEYFILE)),
        "kde": read_ini(tmp.joinpath(*KIOSLAVERC)),
    }


def setup(backend: str, tmp: Path) -> dict[str, str]:
    if backend == "gnome":
        require_tools("gsettings")
    else:
        require_tools("kwriteconfig5", "kreadconfig5")
    env = isolated_env(tmp)
    customise: Callable[[dict[str, str]], None] = (
        customise_gnome if backend == "gnome" else customise_kde
    )
    customise(env)  # previous custom values, not just "no proxy"
    return env


def run(script: str, backend: str, env: dict[str, str], state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, backend, str(state)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("backend", ["gnome", "kde"])
def test_signal_restores_exactly(backend: str, sig: signal.Signals, tmp_path: Path) -> None:
    env = setup(backend, tmp_path)
    state = tmp_path / "state" / "sysproxy.json"
    before = settings_files(tmp_path)
    proc = run(DAEMON, backend, env, state)
    try:
        assert read_line(proc) == "ready"
        assert settings_files(tmp_path) != before
        assert state.exists()
        proc.send_signal(sig)
        assert read_line(proc) == "restored"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert settings_files(tmp_path) == before
    assert not state.exists()


@pytest.mark.parametrize("backend", ["gnome", "kde"])
def test_after_sigkill_next_start_restores(backend: str, tmp_path: Path) -> None:
    env = setup(backend, tmp_path)
    state = tmp_path / "state" / "sysproxy.json"
    before = settings_files(tmp_path)
    proc = run(DAEMON, backend, env, state)
    try:
        assert read_line(proc) == "ready"
        applied = settings_files(tmp_path)
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    # nothing ran at exit: the proxy is still set and the record is still there
    assert settings_files(tmp_path) == applied != before
    status = SystemProxy.for_this_system(backend, environ=env, state_path=state).status()
    assert status.pending_restore and status.owner_pid is None and status.ours

    recover = run(RECOVER, backend, env, state)
    assert read_line(recover) == "recovered"
    assert recover.wait(timeout=30) == 0
    assert settings_files(tmp_path) == before
    assert not state.exists()


@pytest.mark.parametrize("backend", ["gnome", "kde"])
def test_daemon_start_after_sigkill_keeps_the_original_values(backend: str, tmp_path: Path) -> None:
    """A new daemon start over a stale record restores first, so its own restore at exit
    brings back the values from before the crashed run, not the crashed run's proxy."""
    env = setup(backend, tmp_path)
    state = tmp_path / "state" / "sysproxy.json"
    before = settings_files(tmp_path)
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = run(DAEMON, backend, env, state)
        try:
            assert read_line(proc) == "ready"
            proc.send_signal(sig)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    assert settings_files(tmp_path) == before
    assert not state.exists()
