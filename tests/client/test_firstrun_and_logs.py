"""First run from a share link (user config dir, search order, the no-argument guide) and the
log outputs (file with rotation, JSON lines, the journald format)."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ostp_client.config import LogConfig
from ostp_client.logging_setup import configure_logging, under_journald
from ostp_client.paths import user_config_dir
from tests.client.cli_process import free_tcp_port, isolated_env, program, stop, wait_for_port

pytestmark = pytest.mark.timeout(120)

LINK = "ostp://0123456789abcdef@127.0.0.1:9?type=udp"


def _cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
        stdin=subprocess.DEVNULL,
    )


# -- paths -----------------------------------------------------------------------------------


def test_user_config_dir_per_platform(tmp_path: Path) -> None:
    home = tmp_path
    assert user_config_dir({}, "linux", home) == home / ".config/ostp-client"
    assert user_config_dir({"XDG_CONFIG_HOME": "/x"}, "linux", home) == Path("/x/ostp-client")
    assert (
        user_config_dir({"XDG_CONFIG_HOME": "rel"}, "linux", home) == home / ".config/ostp-client"
    )
    assert user_config_dir({"APPDATA": "D:/Profiles/u/AppData/Roaming"}, "win32", home) == Path(
        "D:/Profiles/u/AppData/Roaming/ostp-client"
    )
    assert user_config_dir({}, "win32", home) == home / "AppData/Roaming/ostp-client"
    assert user_config_dir({}, "darwin", home) == home / "Library/Application Support/ostp-client"


# -- run --link, import, search order ---------------------------------------------------------


def test_run_with_a_link_writes_the_user_config_and_the_next_run_finds_it(
    tmp_path: Path,
) -> None:
    env = isolated_env(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    user_config = tmp_path / ".config/ostp-client/config.json"
    port = free_tcp_port()
    # the link's config listens on 1088; a first run that cannot bind still writes the config,
    # so point the port elsewhere afterwards and check both runs use that very file
    process = subprocess.Popen(
        [*program(), "run", "--link", LINK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=work,
    )
    try:
        deadline = time.monotonic() + 30
        while not user_config.exists():
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        _, first_err = process.communicate(timeout=30)
    assert f"wrote {user_config}" in first_err
    assert user_config.stat().st_mode & 0o077 == 0  # it holds the key
    data = json.loads(user_config.read_text())
    assert data["outbounds"][0]["access_key"] == "0123456789abcdef"
    # the same link again: no complaint, no rewrite; another link: refused without --force
    same = _cli("import", LINK, env=env, cwd=work)
    assert same.returncode == 0 and "already holds" in same.stderr
    other = _cli("run", "--link", "ostp://other@127.0.0.1:9", env=env, cwd=work)
    assert other.returncode == 1 and "--force" in other.stderr
    assert json.loads(user_config.read_text()) == data
    data["inbounds"][0]["port"] = port
    data["control"] = {"socket": ""}
    user_config.write_text(json.dumps(data))
    # no -c, no ./config.json: check and run use the user config
    check = _cli("check", env=env, cwd=work)
    assert check.returncode == 0 and str(user_config) in check.stdout
    second = subprocess.Popen(
        [*program(), "run"], stderr=subprocess.PIPE, text=True, env=env, cwd=work
    )
    try:
        wait_for_port(port, second)
    finally:
        stop(second)
    # ./config.json comes first
    (work / "config.json").write_text('{"outbounds": [{"type": "direct", "tag": "local"}]}')
    local = _cli("check", env=env, cwd=work)
    assert local.returncode == 0 and local.stdout.startswith("config.json: OK"), local.stdout
    version = _cli("version", env=env, cwd=work)
    assert f"config.json, {user_config}" in version.stdout


def test_no_config_anywhere_says_where_it_looked(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    result = _cli("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / ".config/ostp-client/config.json") in result.stderr
    assert "ostp-client run --link" in result.stderr
    bad = _cli("run", "--link", "http://nope", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid share link" in bad.stderr
    assert not (tmp_path / ".config/ostp-client").exists()
    stdout = _cli("import", LINK, "-o", "-", env=env, cwd=tmp_path)
    assert json.loads(stdout.stdout)["outbounds"][0]["server"] == "127.0.0.1:9"


def _run_on_a_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run with stdin/stdout/stderr on a pseudo-terminal; returns (status, output)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(30), b"".join(chunks).decode()


def test_no_arguments_guides_a_person_and_fails_for_a_script(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    status, output = _run_on_a_terminal(program(), env, tmp_path)
    assert status == 0, output
    assert "ostp-client run --link 'ostp://KEY@HOST:PORT'" in output
    assert str(tmp_path / ".config/ostp-client/config.json") in output
    (tmp_path / "config.json").write_text('{"outbounds": [{"type": "direct"}]}')
    status, output = _run_on_a_terminal(program(), env, tmp_path)
    assert status == 0 and "Your config: ./config.json" in output
    assert "service install --user" in output
    piped = _cli(env=env, cwd=tmp_path)
    assert piped.returncode == 2
    assert piped.stdout == "" and piped.stderr.startswith("usage: ostp-client")


# -- logs ------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_to_a_rotating_file(tmp_path: Path, restore_logging: object) -> None:
    path = tmp_path / "client.log"
    config = LogConfig(output=str(path), format="json", max_bytes=2000, backups=2)
    configure_logging(config)
    log = logging.getLogger("ostp_client.test")
    for i in range(100):
        log.info('line %d with "quotes" and ünïcode', i)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not at info level")
    logging.getLogger().handlers[0].flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["client.log", "client.log.1", "client.log.2"]  # rotated, 2 kept
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(records[0]) == {"ts", "level", "logger", "message"}
    assert records[-1]["message"] == "failed" and "ValueError: boom" in records[-1]["exc"]
    assert records[-2]["message"] == 'line 99 with "quotes" and ünïcode'
    assert records[-2]["level"] == "info" and records[-2]["logger"] == "ostp_client.test"
    assert records[-2]["ts"].endswith("+00:00")
    assert all("not at info" not in r["message"] for r in records)


def test_logrotate_mode_reopens_a_moved_file(tmp_path: Path, restore_logging: object) -> None:
    path = tmp_path / "client.log"
    configure_logging(LogConfig(output=str(path), max_bytes=0))
    log = logging.getLogger("ostp_client.test")
    log.warning("before")
    path.rename(tmp_path / "client.log.1")  # what logrotate does
    log.warning("after")
    assert "after" in path.read_text() and "before" not in path.read_text()
    assert " WARNING ostp_client.test: before" in (tmp_path / "client.log.1").read_text()


def test_journald_format_has_priorities_and_no_timestamps(tmp_path: Path) -> None:
    port = free_tcp_port()
    config = tmp_path / "client.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": port}],
                "outbounds": [{"type": "direct"}],
                "control": {"socket": ""},
            }
        )
    )
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        env = isolated_env(tmp_path, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        process = subprocess.Popen([*program(), "run", "-c", str(config)], stderr=stderr, env=env)
        try:
            wait_for_port(port, process)
        finally:
            stop(process)
    lines = stderr_path.read_text().splitlines()
    assert lines, "no log output"
    assert any(line.startswith("<6>ostp_client.daemon: ostp-client running") for line in lines)
    assert all(line.startswith(("<6>", "<4>", "<3>", "<7>")) for line in lines), lines
    assert not any(line[3:7].isdigit() for line in lines)  # no "2026-..." timestamp


def test_journal_stream_of_another_file_is_ignored(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with target.open("wb") as handle:
        info = os.fstat(handle.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert under_journald(env, handle)
        assert not under_journald(env, io.StringIO())
        assert not under_journald({"JOURNAL_STREAM": "garbage"}, handle)
        with (tmp_path / "other").open("wb") as other:
            assert not under_journald(env, other)  # inherited by a redirected child


def test_unwritable_log_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "client.json"
    config.write_text(
        json.dumps(
            {
                "log": {"output": str(tmp_path / "missing-dir" / "x.log")},
                "outbounds": [{"type": "direct"}],
            }
        )
    )
    result = _cli("run", "-c", str(config), env=isolated_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot open the log file" in result.stderr


def test_tui_without_the_extra_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from ostp_client.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ostp_tui" else real(name)
    )
    assert main(["tui"]) == 1
    assert "pipx install --force 'ostp-client[tui]'" in capsys.readouterr().err
