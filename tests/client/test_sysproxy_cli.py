"""CLI glue, detection, state file and the sudo runner."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest

from ostp_client.sysproxy import SystemProxy, SystemProxyError, add_sysproxy_commands
from ostp_client.sysproxy.detect import detect_backend
from ostp_client.sysproxy.runner import (
    SubprocessRunner,
    TargetUser,
    sudo_target_user,
    user_environment,
)
from ostp_client.sysproxy.statefile import StateFile

from .sysproxy_fakes import isolated_env, require_tools


def cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ostp-client")
    add_sysproxy_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run_cli(argv: list[str], env: dict[str, str], state: Path) -> tuple[int, str, str]:
    args = cli().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()

    def factory(backend: str | None) -> SystemProxy:
        return SystemProxy.for_this_system(backend, environ=env, state_path=state)

    code = args.func(args, factory=factory, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_set_status_restore(tmp_path: Path) -> None:
    require_tools("kwriteconfig5", "kreadconfig5")
    env = {**isolated_env(tmp_path), "XDG_CURRENT_DESKTOP": "KDE"}
    state = tmp_path / "state" / "sysproxy.json"
    code, out, _ = run_cli(["sysproxy", "status"], env, state)
    assert code == 0 and "backend: kde" in out and "proxy enabled: no" in out
    assert "ProxyType = <absent>" in out

    code, out, _ = run_cli(["sysproxy", "set", "--port", "2000", "--bypass", "a,b"], env, state)
    assert code == 0 and "127.0.0.1:2000" in out and state.exists()
    code, out, _ = run_cli(["sysproxy", "status"], env, state)
    assert "proxy enabled: yes" in out and "httpProxy = http://127.0.0.1 2000" in out
    assert "NoProxyFor = a,b" in out and "set by ostp-client: yes" in out

    code, out, _ = run_cli(["sysproxy", "restore"], env, state)
    assert code == 0 and "restored" in out and not state.exists()
    code, out, _ = run_cli(["sysproxy", "restore"], env, state)
    assert code == 0 and "nothing to restore" in out


def test_cli_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    code, _, err = run_cli(["sysproxy", "set"], env, tmp_path / "s.json")
    assert code == 1 and err.startswith("ostp-client sysproxy: no supported desktop")
    with pytest.raises(SystemExit):
        cli().parse_args(["sysproxy", "set", "--port", "70000"])
    with pytest.raises(SystemExit):
        cli().parse_args(["sysproxy", "--backend", "macos", "status"])


@pytest.mark.parametrize(
    ("env", "platform", "expected"),
    [
        ({"XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, "linux", "gnome"),
        ({"XDG_CURRENT_DESKTOP": "KDE"}, "linux", "kde"),
        ({"DESKTOP_SESSION": "plasmawayland"}, "linux", "kde"),
        ({"DESKTOP_SESSION": "/usr/share/xsessions/cinnamon"}, "linux", "gnome"),
        ({"XDG_CURRENT_DESKTOP": "XFCE"}, "linux", None),
        ({"XDG_CURRENT_DESKTOP": "KDE", "OSTP_SYSPROXY_BACKEND": "gnome"}, "linux", "gnome"),
        ({}, "win32", "windows"),
        ({}, "linux", None),  # no desktop, no session bus: headless
    ],
)
def test_detection(env: dict[str, str], platform: str, expected: str | None) -> None:
    assert detect_backend(env, platform, home="/nonexistent") == expected


def test_detection_rejects_unknown_override() -> None:
    with pytest.raises(ValueError, match="unknown system proxy backend"):
        detect_backend({"OSTP_SYSPROXY_BACKEND": "macos"}, "linux")


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "sysproxy.json"
    path.write_text('{"version": 1, "backend": "kde"')
    with pytest.raises(SystemProxyError, match="unreadable system proxy state file"):
        StateFile(path).load()
    path.write_text(
        '{"version": 1, "backend": "kde", "user": null, "previous": {"a": 1},'
        ' "applied": {}, "owner": {"pid": 1}}'
    )
    with pytest.raises(SystemProxyError, match="bad value types"):
        StateFile(path).load()


def test_user_environment_for_sudo() -> None:
    user = TargetUser("alice", 1000, 1000, "/home/alice")
    base = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "XDG_CONFIG_HOME": "/root/.config",
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/0/bus",
        "GSETTINGS_BACKEND": "keyfile",
    }
    env = user_environment(user, base)
    assert env["HOME"] == "/home/alice" and env["USER"] == env["LOGNAME"] == "alice"
    assert "XDG_CONFIG_HOME" not in env
    assert env.get("DBUS_SESSION_BUS_ADDRESS") != "unix:path=/run/user/0/bus"
    assert env["PATH"] == "/usr/bin" and env["GSETTINGS_BACKEND"] == "keyfile"


def test_no_sudo_target_without_sudo() -> None:
    assert sudo_target_user({}) is None
    assert sudo_target_user({"SUDO_USER": "root"}) is None


@pytest.mark.root  # switching to another user
def test_tools_run_as_the_sudo_user() -> None:
    user = sudo_target_user({"SUDO_USER": "nobody"})
    assert user is not None and user.name == "nobody"
    runner = SubprocessRunner(user, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert runner(["id", "-u"]).strip() == str(user.uid)
    assert runner(["sh", "-c", 'echo "$HOME"']).strip() == user.home
    with pytest.raises(SystemProxyError, match="is not a known user"):
        sudo_target_user({"SUDO_USER": "no-such-user-ostp"})
