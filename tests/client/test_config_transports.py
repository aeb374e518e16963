"""The ostp outbound's transport options: the models, every share-link key of spec §10.9, and
upstream's flat `transport`/`reality` blocks (spec §10.10) as `import` and `format` see them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ostp_client.config import (
    ConfigError,
    OstpOutboundConfig,
    config_from_data,
    config_from_share_link,
    dump_config,
    ostp_outbound_from_share_link,
)
from ostp_proto.transport import encode_key, generate_keypair
from ostp_server.cli import share_links
from ostp_server.config import parse_config_text as parse_server_config

PBK = encode_key(generate_keypair()[1])
SID = "0123456789abcdef"


def _outbound(link: str) -> tuple[OstpOutboundConfig, list[str]]:
    config, warnings = config_from_share_link(link)
    outbound = config.outbounds[0]
    assert isinstance(outbound, OstpOutboundConfig)
    return outbound, warnings


def _issues(data: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config_from_data(data)
    return {issue.path: issue.message for issue in info.value.issues}


# -- the native model ----------------------------------------------------------------------


def test_defaults_are_udp_and_the_servers_port() -> None:
    outbound = OstpOutboundConfig(server="198.51.100.7:50000", access_key="k")  # type: ignore[arg-type]
    assert outbound.transport == "udp"
    assert outbound.transport_port is None and outbound.sni is None and outbound.reality is None
    assert (outbound.auto_fallback, outbound.auto_udp_timeout) == ("tcp", 3.0)


def test_transport_fields_validate_by_path() -> None:
    base = {"type": "ostp", "server": "h:1", "access_key": "k"}
    issues = _issues(
        {
            "outbounds": [
                {
                    **base,
                    "transport": "quic",
                    "transport_port": 0,
                    "sni": "bad host\r\nX-Injected: 1",
                    "reality": {"public_key": "AAAA", "short_id": "xyz", "server_name": "a b"},
                    "auto_udp_timeout": 0,
                }
            ]
        }
    )
    assert "'udp', 'tcp', 'wss' or 'auto'" in issues["outbounds[0].transport"]
    assert "greater than or equal to 1" in issues["outbounds[0].transport_port"]
    assert "host name" in issues["outbounds[0].sni"]  # no header injection through Host
    assert "32 bytes" in issues["outbounds[0].reality.public_key"]
    assert "16 hex" in issues["outbounds[0].reality.short_id"]
    assert "host name" in issues["outbounds[0].reality.server_name"]
    assert "outbounds[0].auto_udp_timeout" in issues
    assert len(issues) == 7, issues


@pytest.mark.parametrize(
    ("transport", "nat", "message"),
    [
        ("tcp", {"stun": "192.0.2.9"}, "STUN and TURN work over UDP only"),
        ("wss", {"stun": "192.0.2.9"}, "STUN and TURN work over UDP only"),
        (
            "auto",
            {"turn": {"server": "192.0.2.9", "username": "u", "password": "p"}},
            "not to TURN",
        ),
    ],
)
def test_nat_goes_with_udp_only(transport: str, nat: dict[str, Any], message: str) -> None:
    outbound = {"type": "ostp", "server": "h:1", "access_key": "k", "transport": transport}
    issues = _issues({"outbounds": [{**outbound, "nat": nat}]})
    assert message in issues["outbounds[0].transport"]


def test_auto_with_stun_discovery_is_fine() -> None:
    outbound = {"type": "ostp", "server": "h:1", "access_key": "k", "transport": "auto"}
    config_from_data({"outbounds": [{**outbound, "nat": {"stun": "192.0.2.9"}}]})


def test_dump_and_load_keep_every_transport_field() -> None:
    data = {
        "type": "ostp",
        "server": "198.51.100.7:50000",
        "access_key": "k",
        "transport": "auto",
        "transport_port": 443,
        "sni": "cdn.example.net",
        "reality": {"public_key": PBK, "short_id": SID.upper(), "server_name": "www.example.com"},
        "auto_fallback": "wss",
        "auto_udp_timeout": 2.5,
        "auto_probe_interval": 60,
    }
    config, _ = config_from_data({"outbounds": [data]})
    again, _ = config_from_data(json.loads(dump_config(config)))
    assert again == config
    outbound = again.outbounds[0]
    assert isinstance(outbound, OstpOutboundConfig) and outbound.reality is not None
    assert outbound.reality.short_id == SID  # normalised to lower case
    assert len(outbound.reality.public_key_bytes) == 32


# -- share links (spec §10.9) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "transport"),
    [
        ("", "udp"),
        ("?type=udp", "udp"),
        ("?type=tcp", "tcp"),
        ("?type=uot", "tcp"),
        ("?type=TCP", "tcp"),
        ("?type=tcp&wss=true", "wss"),
        ("?type=uot&wss=true", "wss"),
        ("?type=tcp&wss=false", "tcp"),
    ],
)
def test_link_type_and_wss(query: str, transport: str) -> None:
    outbound, warnings = _outbound(f"ostp://k@198.51.100.7:50000{query}")
    assert outbound.transport == transport
    assert outbound.transport_port is None  # the link's own port, where servers listen on TCP
    assert outbound.server == "198.51.100.7:50000"
    assert warnings == []


@pytest.mark.parametrize(
    ("query", "warning"),
    [
        ("?type=udp&wss=true", "wss=true applies to type=tcp only"),
        ("?type=quic", "type=quic: unknown transport; using udp"),
        ("?type=tcp&fp=chrome", "fp ignored"),
        ("?type=tcp&spx=%2F", "spx ignored"),
        ("?type=tcp&owndns=true", "owndns is ignored"),
        ("?type=tcp&security=tls", "security=tls is ignored"),
    ],
)
def test_link_keys_that_only_warn(query: str, warning: str) -> None:
    _, warnings = _outbound(f"ostp://k@h:1{query}")
    assert any(warning in w for w in warnings), warnings
    assert not any("not supported" in w for w in warnings)


def test_link_sni_and_reality() -> None:
    link = f"ostp://k@198.51.100.7:50000?security=reality&sni=www.example.com&pbk={PBK}&sid={SID}&type=tcp&fp=chrome"
    outbound, warnings = _outbound(link)
    assert outbound.transport == "tcp" and outbound.sni == "www.example.com"
    assert outbound.reality is not None
    assert (outbound.reality.public_key, outbound.reality.short_id) == (PBK, SID)
    assert outbound.reality.server_name is None  # follows `sni`, as upstream's hello does
    assert warnings == [
        "fp ignored: the ClientHello is upstream's fixed one (upstream ignores them too)"
    ]
    # pbk without security=reality: upstream's links always enable Reality (spec §10.9)
    outbound, _ = _outbound(f"ostp://k@h:1?type=tcp&pbk={PBK}&sid={SID}")
    assert outbound.reality is not None
    # Reality on a UDP link is kept (for tcp/auto later), with a word about it
    outbound, warnings = _outbound(f"ostp://k@h:1?security=reality&pbk={PBK}&sid={SID}")
    assert outbound.transport == "udp" and outbound.reality is not None
    assert any("Reality is used over TCP only" in w for w in warnings)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?type=tcp&security=reality&sid=" + SID, "Reality needs both pbk"),
        (f"?type=tcp&security=reality&pbk={PBK}", "Reality needs both pbk"),
        (f"?type=tcp&pbk=AAAA&sid={SID}", "pbk: an X25519 public key is 32 bytes"),
        (f"?type=tcp&pbk=no*base64&sid={SID}", "pbk: not base64url"),
        (f"?type=tcp&pbk={PBK}&sid=12", "sid: the short id is 16 hex characters"),
        ("?type=tcp&sni=a%0d%0aHost:%20x", "sni: a host name"),
    ],
)
def test_bad_link_keys_are_named(query: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_share_link(f"ostp://k@h:1{query}")
    with pytest.raises(ValueError, match=message):
        ostp_outbound_from_share_link(f"ostp://k@h:1{query}")


@pytest.mark.parametrize("kind", ["udp", "tcp", "wss", "reality"])
def test_links_our_server_makes_import_as_that_transport(kind: str) -> None:
    server = parse_server_config(
        json.dumps(
            {
                "listen": "0.0.0.0:50000",
                "access_keys": ["abc123"],
                "reality": {
                    "private_key": encode_key(bytes(range(32))),
                    "short_id": SID,
                    "server_names": ["www.example.com"],
                },
            }
        )
    )
    (link,) = share_links(server, "198.51.100.7", kind)
    outbound, warnings = _outbound(link)
    assert warnings == []
    assert outbound.transport == ("tcp" if kind == "reality" else kind)
    assert outbound.server == "198.51.100.7:50000" and outbound.transport_port is None
    if kind == "reality":
        assert server.reality is not None and outbound.reality is not None
        assert outbound.reality.public_key == server.reality.public_key_text
        assert outbound.reality.short_id == SID and outbound.sni == "www.example.com"
    else:
        assert outbound.reality is None


# -- upstream's flat config (spec §10.10) --------------------------------------------------


def _flat(**blocks: Any) -> OstpOutboundConfig:
    config, _ = config_from_data(
        {"mode": "client", "server": "h:50000", "access_key": "k", **blocks}
    )
    outbound = config.outbounds[0]
    assert isinstance(outbound, OstpOutboundConfig)
    return outbound


def test_flat_transport_and_reality_blocks() -> None:
    outbound = _flat(
        transport={"mode": "uot", "stealth_sni": "cdn.example.net", "stealth_port": 443},
        reality={"enabled": True, "sni": "x.example", "pbk": PBK, "sid": SID, "fp": "chrome"},
    )
    assert outbound.transport == "tcp" and outbound.transport_port == 443
    assert outbound.sni == "cdn.example.net"
    assert outbound.reality is not None and outbound.reality.public_key == PBK
    assert outbound.reality.server_name is None  # stealth_sni is upstream's hello SNI
    outbound = _flat(
        transport={"mode": "tcp", "wss": True, "stealth_port": 8443},
        reality={"enabled": True, "sni": "x.example", "pbk": PBK, "sid": SID},
    )
    assert (outbound.transport, outbound.transport_port) == ("wss", 8443)
    assert outbound.reality is not None and outbound.reality.server_name == "x.example"
    outbound = _flat(
        transport={"mode": "udp", "stealth_sni": "a.example"}, reality={"enabled": False}
    )
    assert (outbound.transport, outbound.sni, outbound.reality) == ("udp", "a.example", None)


def test_flat_warnings() -> None:
    _, warnings = config_from_data(
        {
            "mode": "client",
            "server": "h:1",
            "access_key": "k",
            "transport": {"mode": "uot"},
            "reality": {"enabled": True, "pbk": PBK, "sid": SID, "spx": "/"},
        }
    )
    assert any("stealth_port is not set" in w for w in warnings)
    assert any("reality.fp and reality.spx are ignored" in w for w in warnings)
    assert not any("not supported" in w for w in warnings)
    _, warnings = config_from_data(
        {
            "mode": "client",
            "server": "h:1",
            "access_key": "k",
            "transport": {"mode": "udp", "wss": True},
            "reality": {"enabled": True, "pbk": PBK, "sid": SID},
        }
    )
    assert any("transport.wss applies to mode uot/tcp only" in w for w in warnings)
    assert any("reality is used with transport mode uot/tcp only" in w for w in warnings)


def test_flat_errors_use_flat_names() -> None:
    issues = _issues(
        {
            "mode": "client",
            "server": "h:1",
            "access_key": "k",
            "transport": {"mode": "uot", "stealth_port": 70000, "stealth_sni": "a b"},
            "reality": {"enabled": True, "pbk": "x", "sid": "zz"},
        }
    )
    assert set(issues) == {
        "transport.stealth_port",
        "transport.stealth_sni",
        "reality.pbk",
        "reality.sid",
    }, issues
    issues = _issues(
        {"mode": "client", "server": "h:1", "access_key": "k", "transport": {"mode": "x"}}
    )
    assert "expected udp, uot or tcp" in issues["transport.mode"]
    issues = _issues({"mode": "client", "server": "h:1", "access_key": "k", "transport": 5})
    assert "transport" in issues


# -- the programs ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("ostp-client", path=str(Path(sys.executable).parent))
    program = (
        [found] if found else [sys.executable, "-c", "from ostp_client.cli import main; main()"]
    )
    return subprocess.run(
        [*program, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_import_and_format_programs(tmp_path: Path) -> None:
    link = f"ostp://k@198.51.100.7:50000?security=reality&sni=www.example.com&pbk={PBK}&sid={SID}&type=tcp"
    done = _cli("import", link, "-o", "-")
    assert done.returncode == 0, done.stderr
    assert "not supported" not in done.stderr and "warning" not in done.stderr
    outbound = json.loads(done.stdout)["outbounds"][0]
    assert outbound["transport"] == "tcp" and outbound["sni"] == "www.example.com"
    assert outbound["reality"] == {"public_key": PBK, "short_id": SID}
    flat = tmp_path / "config.json"
    flat.write_text(
        json.dumps(
            {
                "mode": "client",
                "server": "198.51.100.7:50000",
                "access_key": "k",
                "transport": {"mode": "uot", "wss": True, "stealth_port": 50000},
                "reality": {"enabled": True, "pbk": PBK, "sid": SID, "sni": "www.example.com"},
            }
        )
    )
    done = _cli("format", "-c", str(flat), "--stdout")
    assert done.returncode == 0, done.stderr
    outbound = json.loads(done.stdout)["outbounds"][0]
    assert outbound["transport"] == "wss" and outbound["transport_port"] == 50000
    assert outbound["reality"]["server_name"] == "www.example.com"
