"""The `ostp-client` program itself: subcommands, and `run` as a real process with curl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.proxy_helpers import CURL, Origin, require_curl, run_origin

pytestmark = pytest.mark.timeout(60)


def _program() -> list[str]:
    found = shutil.which("ostp-client", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-c", "from ostp_client.cli import main; main()"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_program(), *args], capture_output=True, text=True, timeout=30, cwd=cwd, check=False
    )


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def test_version_and_schema() -> None:
    assert _cli("version").stdout.startswith("ostp-client ")
    schema = json.loads(_cli("schema").stdout)
    assert schema["title"] == "ostp-client configuration"


def test_check_reports_field_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"outbounds": [{"type": "ostp", "server": "nohost", "access_key": "k"}]}')
    result = _cli("check", "-c", str(bad))
    assert result.returncode == 2
    assert "outbounds[0].server: missing port" in result.stderr
    missing = _cli("check", "-c", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "not found" in missing.stderr
    assert "ostp-client import" in missing.stderr


def test_check_lists_every_problem_and_refuses_two_inbounds_on_one_port(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "inbounds": [
                    {"type": "local_proxy", "tag": "a", "listen": "0.0.0.0", "port": 2080},
                    {"type": "local_proxy", "tag": "b", "listen": "127.0.0.1", "port": 2080},
                ],
                "outbounds": [{"type": "direct"}],
                "routing": {"rules": [{"ip_cidr": ["x", "10.0.0.0/8", "y"], "outbound": "z"}]},
            }
        )
    )
    result = _cli("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any(
        line.strip().startswith("inbounds[1].port: 127.0.0.1:2080 collides with inbounds[0]")
        and "0.0.0.0:2080" in line
        for line in lines
    ), result.stderr
    assert any("routing.rules[0].ip_cidr[0]: 'x'" in line for line in lines)
    assert any("routing.rules[0].ip_cidr[2]: 'y'" in line for line in lines)
    assert any("routing.rules[0].outbound: no outbound is tagged 'z'" in line for line in lines)


def test_import_format_check_and_proxy_env(tmp_path: Path) -> None:
    out = tmp_path / "config.json"
    result = _cli("import", "ostp://abc123@198.51.100.7:50000?type=udp", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o077 == 0  # the file holds the key
    assert _cli("import", "ostp://k@h:1", "-o", str(out)).returncode == 1  # no clobbering
    check = _cli("check", "-c", str(out))
    assert check.returncode == 0, check.stderr
    assert "default outbound 'proxy'" in check.stdout
    data = json.loads(out.read_text())
    assert data["outbounds"][0]["access_key"] == "abc123"
    flat = tmp_path / "flat.json"
    flat.write_text(
        '{"mode": "client", // comment\n "server": "h:1", "access_key": "k",'
        ' "socks5_bind": "127.0.0.1:2000"}'
    )
    assert _cli("format", "-c", str(flat)).returncode == 0
    converted = json.loads(flat.read_text())
    assert converted["outbounds"][0]["type"] == "ostp"
    env = _cli("proxy-env", "-c", str(flat))
    assert 'export all_proxy="socks5h://127.0.0.1:2000"' in env.stdout
    assert 'export http_proxy="http://127.0.0.1:2000"' in env.stdout
    default_env = _cli("proxy-env", cwd=tmp_path)  # reads ./config.json (the import above)
    assert default_env.returncode == 0
    assert ":1088" in default_env.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the daemon did not start listening")


def test_run_serves_curl_and_stops_on_sigterm(origin: Origin, tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": port}],
                "outbounds": [{"type": "direct"}, {"type": "block"}],
                "routing": {"rules": [{"domain": ["no.test"], "outbound": "block"}]},
                # not the default path: a daemon of another test run may hold that one
                "control": {"socket": ""},
            }
        )
    )
    process = subprocess.Popen(
        [*_program(), "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(port, process)
        good = subprocess.run(
            [
                CURL,
                "-sS",
                "-x",
                f"socks5h://127.0.0.1:{port}",
                origin.url("/bytes/100000"),
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        blocked = subprocess.run(
            [
                CURL,
                "-sS",
                "-x",
                f"http://127.0.0.1:{port}",
                "http://no.test/",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert good.stdout == "200", good.stderr
        assert blocked.stdout == "403"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0"])
def test_run_on_a_busy_port_says_so_in_one_line(tmp_path: Path, listen: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "cfg.json"
        config.write_text(
            json.dumps(
                {
                    "inbounds": [
                        {"type": "local_proxy", "tag": "proxy", "listen": listen, "port": port}
                    ],
                    "outbounds": [{"type": "direct"}],
                    "control": {"socket": ""},
                }
            )
        )
        result = _cli("run", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'ostp-client: inbound "proxy" cannot listen on {listen}:{port}: address already in use'
    ]


# `ostp-client run` whose name lookups of "slow.test" hang for a minute (a DNS server that
# does not answer); nothing reaches a real resolver
SLOW_LOOKUPS = """
import socket, sys, time
real = socket.getaddrinfo
def slow(host, *args, **kwargs):
    if host in ("slow.test", b"slow.test"):
        print("looking up slow.test", file=sys.stderr, flush=True)
        time.sleep(60)
    return real(host, *args, **kwargs)
socket.getaddrinfo = slow
from ostp_client.cli import main
main()
"""


def test_run_exits_promptly_while_a_name_lookup_hangs(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "port": port}],
                "outbounds": [{"type": "direct"}],
                "control": {"socket": ""},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_LOOKUPS, "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(port, process)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        name = b"slow.test"
        client.sendall(b"\x05\x01\x00\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50")
        assert process.stderr is not None
        lines: list[str] = []
        while not lines or "looking up slow.test" not in lines[-1]:
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=20)  # the lookup has 50+ s to go
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0
    logged = [line for line in rest.splitlines() if line.strip()]
    assert "ostp-client stopped" in logged[-1], rest  # the last thing the daemon says


def test_run_with_an_invalid_config_starts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text('{"outbounds": [{"type": "direct", "bogus": 1}]}')
    result = _cli("run", "-c", str(config))
    assert result.returncode == 2
    assert "outbounds[0].bogus: unknown field" in result.stderr
