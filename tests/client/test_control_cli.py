"""`ostp-client run` serves the control socket; `ostp-client ctl` uses it; SIGHUP reloads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tui.live import (
    base_config,
    program,
    short_socket_dir,
    start_daemon_process,
    stop_process,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_socket_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program(), "ctl", "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _wait_ctl(socket: Path, process: subprocess.Popen[str]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise AssertionError(
                f"daemon exited: {process.stderr.read() if process.stderr else ''}"
            )
        if socket.exists() and _ctl(socket, "status").returncode == 0:
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError("control socket never answered")


def _route_matches(socket: Path) -> list[str]:
    done = _ctl(socket, "--json", "routes")
    assert done.returncode == 0, done.stderr
    return [rule["match"] for rule in json.loads(done.stdout)["rules"]]


def test_ctl_commands_and_sighup_reload(sock_dir: Path) -> None:
    socket = sock_dir / "control.sock"
    config = base_config(str(socket), log={"level": "info"})
    config_file = sock_dir / "cfg.json"
    config_file.write_text(json.dumps(config))
    process = start_daemon_process(config_file)
    try:
        _wait_ctl(socket, process)
        status = _ctl(socket, "status")
        assert status.returncode == 0
        assert "running" in status.stdout and "direct" in status.stdout
        assert "proxy-in" in status.stdout
        as_json = json.loads(_ctl(socket, "--json", "status").stdout)
        assert [o["id"] for o in as_json["outbounds"]] == ["direct", "block"]
        assert json.loads(_ctl(socket, "connections", "--json").stdout)["connections"] == []
        assert "ID" in _ctl(socket, "connections").stdout
        routes = _ctl(socket, "routes")
        assert "domain_suffix=blocked.test" in routes.stdout and "(default)" in routes.stdout
        logs = _ctl(socket, "logs", "--level", "info")
        assert "control socket on" in logs.stdout
        refused = _ctl(socket, "reconnect", "direct")
        assert refused.returncode == 1 and "no sessions" in refused.stderr
        assert _ctl(socket, "close", "99").returncode == 1

        config["routing"]["rules"].append({"domain": ["example.com"], "outbound": "direct"})
        config_file.write_text(json.dumps(config))
        process.send_signal(signal.SIGHUP)
        for _ in range(200):
            if "domain=example.com" in _route_matches(socket):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert _route_matches(socket) == [
            "domain_suffix=blocked.test",
            "domain=example.com",
            "(default)",
        ]

        config_file.write_text('{"outbounds": []}')  # invalid: refused, the old one stays
        process.send_signal(signal.SIGHUP)
        for _ in range(200):
            if "reload refused" in _ctl(socket, "logs").stdout:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert "reload refused" in _ctl(socket, "logs").stdout
        assert process.poll() is None
        assert len(_route_matches(socket)) == 3
        reload = _ctl(socket, "reload")
        assert reload.returncode == 1 and "outbounds" in reload.stderr
    finally:
        stop_process(process)
    assert process.returncode == 0
    assert not socket.exists()


def test_ctl_without_a_daemon(sock_dir: Path) -> None:
    done = _ctl(sock_dir / "nothing.sock", "status")
    assert done.returncode == 3
    assert "nothing.sock" in done.stderr


def _with_closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the program with a stdout pipe whose reader is gone before it starts (`| head`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*program(), *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)


def test_ctl_options_after_the_action_bad_counts_and_a_closed_stdout(sock_dir: Path) -> None:
    socket = sock_dir / "control.sock"
    config_file = sock_dir / "cfg.json"
    config_file.write_text(json.dumps(base_config(str(socket))))
    process = start_daemon_process(config_file)
    try:
        _wait_ctl(socket, process)
        after = subprocess.run(
            [*program(), "ctl", "status", "--socket", str(socket), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["state"] == "running"
        both = _ctl(socket, "logs", "--socket", str(socket), "-n", "5")
        assert both.returncode == 0, both.stderr

        negative = _ctl(socket, "logs", "-n", "-5")
        assert negative.returncode == 2
        assert "negative" in negative.stderr and "Traceback" not in negative.stderr

        for args in (
            ["version"],
            ["schema"],
            ["ctl", "--socket", str(socket), "connections"],
            ["ctl", "status", "--socket", str(socket)],
            ["ctl", "--socket", str(socket), "--json", "logs"],
        ):
            closed = _with_closed_stdout(*args)
            assert closed.returncode == 141, (args, closed.stderr)
            assert closed.stderr == "", (args, closed.stderr)
        assert process.poll() is None
    finally:
        stop_process(process)
    assert process.returncode == 0


def _status_pid(socket: Path) -> int:
    done = _ctl(socket, "--json", "status")
    assert done.returncode == 0, done.stderr
    pid: int = json.loads(done.stdout)["pid"]
    return pid


def test_a_second_daemon_leaves_a_live_control_socket_alone(sock_dir: Path) -> None:
    socket = sock_dir / "control.sock"
    config_file = sock_dir / "cfg.json"
    config_file.write_text(json.dumps(base_config(str(socket))))
    first = start_daemon_process(config_file)
    try:
        _wait_ctl(socket, first)
        second = subprocess.run(
            [*program(), "run", "-c", str(config_file)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"ostp-client: control socket {socket} is in use by a running daemon"
            f" (pid {first.pid}); stop it or set control.socket"
        ]
        assert _status_pid(socket) == first.pid  # the first one is still reachable
        assert first.poll() is None
    finally:
        stop_process(first)
    assert first.returncode == 0
    assert not socket.exists()

    # a daemon that was killed leaves its socket file: the next one takes it over
    dead = start_daemon_process(config_file)
    try:
        _wait_ctl(socket, dead)
    finally:
        stop_process(dead, signal.SIGKILL)
    assert socket.exists()
    third = start_daemon_process(config_file)
    try:
        _wait_ctl(socket, third)
        assert _status_pid(socket) == third.pid
    finally:
        stop_process(third)
    assert third.returncode == 0


def test_format_bytes_is_shared_by_ctl_and_the_tui() -> None:
    from ostp_client.control.protocol import format_bytes
    from ostp_tui import widgets

    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**4) == "3072.0 GiB"
    assert widgets.format_rate(2048) == "2.0 KiB/s"
