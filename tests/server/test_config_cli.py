"""Config parsing (own and upstream format), the CLI, and the network-facing parsers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fuzz.server_datagram import test_one_input as fuzz_server
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_server import ConfigError, generate_key, parse_config_text, share_links
from ostp_server.cli import main

RUN_SERVER = "import sys; from ostp_server.cli import main; sys.exit(main(sys.argv[1:]))"

UPSTREAM = {
    "mode": "server",
    "listen": "0.0.0.0:50000",
    "access_keys": ["0123456789abcdef0123456789abcdef", "second-key"],
    "reality": {"enabled": False},
    "api": {"enabled": True},
    "debug": False,
}


def test_upstream_server_json_unchanged() -> None:
    cfg = parse_config_text(json.dumps(UPSTREAM))
    assert cfg.listen_addresses == [("0.0.0.0", 50000)]
    assert cfg.key_strings() == UPSTREAM["access_keys"]
    assert cfg.ignored_keys() == ["api"]
    assert cfg.reality is not None and cfg.reality_enabled is None  # "enabled": false
    assert cfg.max_sessions == 1024 and cfg.idle_timeout == 600


def test_users_lists_ipv6_and_upstream_user_objects() -> None:
    cfg = parse_config_text(
        json.dumps(
            {
                "listen": ["127.0.0.1:9000", "[::1]:9001"],
                "access_keys": [
                    {"name": "alice", "key": "k-alice"},
                    {"access_key": "k-bob", "name": "bob", "limit_bytes": 10},
                    "k-plain",
                ],
                "max_sessions": 5,
                "idle_timeout": 30,
                "log_level": "DEBUG",
            }
        )
    )
    assert cfg.listen_addresses == [("127.0.0.1", 9000), ("::1", 9001)]
    assert cfg.key_labels() == ["alice", "bob", "key#2"]
    assert cfg.key_strings() == ["k-alice", "k-bob", "k-plain"]
    assert cfg.effective_log_level == "debug"
    assert "k-alice" not in repr(cfg) and "k-alice" not in str(cfg)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[1, 2]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"access_keys": []}', "access_keys"),
        ('{"access_keys": [""]}', "access_keys[0]"),
        ('{"access_keys": ["k"], "listen": "example.com:1"}', "IP address"),
        ('{"access_keys": ["k"], "listen": "1.2.3.4"}', "host:port"),
        ('{"access_keys": ["k"], "listen": "1.2.3.4:70000"}', "0 to 65535"),
        ('{"access_keys": ["k"], "mode": "client"}', "mode"),
        ('{"access_keys": ["k"], "max_sessions": 0}', "max_sessions"),
    ],
)
def test_config_errors_say_where(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config_text(raw)


def test_gen_key_and_links(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key()
    assert re.fullmatch(r"[0-9a-f]{32}", key) and key != generate_key()
    assert main(["gen-key"]) == 0
    assert re.fullmatch(r"[0-9a-f]{32}\n", capsys.readouterr().out)
    path = tmp_path / "server.json"
    path.write_text(json.dumps(UPSTREAM))
    assert main(["links", "-c", str(path), "--host", "vpn.example.com", "--transport", "udp"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ostp://0123456789abcdef0123456789abcdef@vpn.example.com:50000",
        "ostp://second-key@vpn.example.com:50000",
    ]
    cfg = parse_config_text(json.dumps(UPSTREAM))
    assert share_links(cfg, "2001:db8::1")[0].endswith("@[2001:db8::1]:50000")


REALITY_PRIVATE = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVpbXF1eX2A"  # the vectors' server key
REALITY_PBK = "ZLEBsdC-WocEvQePmJUAH8A-jp-VIvGI3RKNmEbUhGY"


def test_reality_block_and_every_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = dict(UPSTREAM)
    raw["reality"] = {  # upstream's own field names
        "enabled": True,
        "dest": "www.microsoft.com:443",
        "private_key": REALITY_PRIVATE,
        "pbk": REALITY_PBK,
        "sid": "0123456789ABCDEF",
        "sni_list": ["www.microsoft.com", "microsoft.com"],
    }
    path = tmp_path / "server.json"
    path.write_text(json.dumps(raw))
    cfg = parse_config_text(path.read_text())
    reality = cfg.reality_enabled
    assert reality is not None and reality.short_id == "0123456789abcdef"
    assert reality.dest_address == ("www.microsoft.com", 443)
    assert reality.public_key_text == REALITY_PBK
    assert REALITY_PRIVATE not in repr(cfg)
    assert main(["links", "-c", str(path), "--host", "203.0.113.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    base = "ostp://0123456789abcdef0123456789abcdef@203.0.113.5:50000"
    assert lines[:4] == [
        base,
        base + "?type=tcp",
        base + "?type=tcp&wss=true",
        base + f"?security=reality&sni=www.microsoft.com&pbk={REALITY_PBK}"
        "&sid=0123456789abcdef&type=tcp",
    ]
    assert len(lines) == 8 and lines[4].startswith("ostp://second-key@")
    raw["tcp"] = False
    path.write_text(json.dumps(raw))
    assert main(["links", "-c", str(path), "--host", "h", "--transport", "reality"]) == 2
    assert "does not offer reality" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reality", "fragment"),
    [
        ({"sid": "0123456789abcdef", "sni_list": ["a"]}, "private_key is required"),
        ({"private_key": "short", "sid": "0123456789abcdef", "sni_list": ["a"]}, "private_key"),
        ({"private_key": REALITY_PRIVATE, "sid": "0123", "sni_list": ["a"]}, "16 hex"),
        ({"private_key": REALITY_PRIVATE, "sid": "0123456789abcdef"}, "server_names"),
        (
            {
                "private_key": REALITY_PRIVATE,
                "sid": "0123456789abcdef",
                "sni_list": ["a"],
                "pbk": "AAAA",
            },
            "not the public key",
        ),
        (
            {
                "private_key": REALITY_PRIVATE,
                "sid": "0123456789abcdef",
                "sni_list": ["a"],
                "dest": "no-port",
            },
            "host:port",
        ),
    ],
)
def test_reality_config_errors(reality: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config_text(json.dumps({"access_keys": ["k"], "reality": reality}))


def test_gen_key_reality(capsys: pytest.CaptureFixture[str]) -> None:
    from ostp_proto.transport import decode_key, public_key

    assert main(["gen-key", "--reality"]) == 0
    fields = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(fields) == {"private_key", "public_key", "short_id"}
    assert public_key(decode_key(fields["private_key"])) == decode_key(fields["public_key"])
    assert re.fullmatch(r"[0-9a-f]{16}", fields["short_id"])
    cfg = parse_config_text(
        json.dumps(
            {
                "access_keys": ["k"],
                "reality": {
                    "private_key": fields["private_key"],
                    "short_id": fields["short_id"],
                    "server_names": ["www.example.com"],
                },
            }
        )
    )
    assert cfg.reality_enabled is not None
    assert cfg.reality_enabled.public_key_text == fields["public_key"]


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "server.json"
    path.write_text('{"access_keys": []}')
    with pytest.raises(SystemExit) as exc:
        main(["run", "-c", str(path)])
    assert exc.value.code == 2
    assert "access_keys" in capsys.readouterr().err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_as_a_process_and_stop_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    key = generate_key()
    path = tmp_path / "server.json"
    path.write_text(
        json.dumps({"mode": "server", "listen": "127.0.0.1:0", "access_keys": [key], "dns": {}})
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_SERVER, "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "listening on udp" in line:
                break
        assert any("listening on udp 127.0.0.1:" in x for x in lines), lines
        assert any("'dns' is not used" in x for x in lines), lines
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        rest = proc.stderr.read()
        assert "shutting down" in rest
        assert key not in "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@given(st.binary(max_size=1500))
@settings(max_examples=300, deadline=None)
def test_fuzz_entry_point(data: bytes) -> None:
    fuzz_server(data)
