"""`ostp-client run` with `set_system_proxy`: set on start, restored exactly on SIGTERM and
SIGINT, and after SIGKILL by the next start. Real daemon process, real gsettings/kwriteconfig5
in an isolated home."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .sysproxy_fakes import isolated_env
from .test_sysproxy_crash import settings_files, setup

pytestmark = pytest.mark.timeout(90)

CLIENT = Path(sys.executable).with_name("ostp-client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    config = tmp / "client.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": port, "set_system_proxy": True}],
                "outbounds": [{"type": "direct", "tag": "direct"}],
                "control": {"socket": str(tmp / "control.sock")},
            }
        )
    )
    return subprocess.Popen(
        [str(CLIENT), "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "daemon.log").open("ab"),
    )


def _wait_applied(tmp: Path, before: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if settings_files(tmp) != before and "restored at exit" in (tmp / "daemon.log").read_text():
            return
        time.sleep(0.1)
    raise AssertionError((tmp / "daemon.log").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("backend", ["gnome", "kde"])
def test_daemon_sets_and_restores_exactly(
    backend: str, sig: signal.Signals, tmp_path: Path
) -> None:
    env = setup(backend, tmp_path)
    env["OSTP_SYSPROXY_BACKEND"] = backend
    before = settings_files(tmp_path)
    port = _free_port()
    proc = _start(tmp_path, env, port)
    try:
        _wait_applied(tmp_path, before)
        applied = json.dumps(settings_files(tmp_path))
        assert str(port) in applied and "127.0.0.1" in applied
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert settings_files(tmp_path) == before


@pytest.mark.parametrize("backend", ["gnome", "kde"])
def test_next_start_restores_after_sigkill(backend: str, tmp_path: Path) -> None:
    env = setup(backend, tmp_path)
    env["OSTP_SYSPROXY_BACKEND"] = backend
    before = settings_files(tmp_path)
    proc = _start(tmp_path, env, _free_port())
    try:
        _wait_applied(tmp_path, before)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert settings_files(tmp_path) != before  # nothing ran at exit
    # The next start, even one that does not set the proxy itself, restores first.
    (tmp_path / "daemon.log").write_text("")
    config = tmp_path / "plain.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": _free_port()}],
                "outbounds": [{"type": "direct", "tag": "direct"}],
                "control": {"socket": ""},
            }
        )
    )
    plain = subprocess.Popen(
        [str(CLIENT), "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "daemon.log").open("ab"),
    )
    try:
        log = tmp_path / "daemon.log"
        deadline = time.monotonic() + 30
        while "left behind" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "left behind" in log.read_text()
        assert settings_files(tmp_path) == before
        plain.send_signal(signal.SIGTERM)
        assert plain.wait(timeout=30) == 0
    finally:
        plain.kill()
        plain.wait()


def test_headless_machine_gets_a_clear_hint(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    proc = _start(tmp_path, env, _free_port())
    try:
        deadline = time.monotonic() + 30
        log = ""
        while "proxy-env" not in log and time.monotonic() < deadline:
            time.sleep(0.1)
            log = (tmp_path / "daemon.log").read_text()
        assert "cannot set the system proxy" in log and "proxy-env" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
