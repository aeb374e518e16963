"""Config: models, error messages by JSON path, comments, flat config, share links, schema."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.config import (
    ClientConfig,
    ConfigError,
    LocalProxyInboundConfig,
    OstpOutboundConfig,
    RoutingRule,
    config_from_data,
    config_from_share_link,
    config_json_schema,
    dump_config,
    ostp_outbound_from_share_link,
    parse_config_text,
    parse_share_link,
    strip_json_comments,
)

ISSUE_EXAMPLE = """{
  // the example from issue 4
  "log": {"level": "info"},
  "inbounds": [
    {"type": "local_proxy", "tag": "proxy-in", "listen": "127.0.0.1", "port": 1088,
     "users": [{"username": "u", "password": "p"}], "set_system_proxy": false}
  ],
  "outbounds": [
    {"type": "ostp", "tag": "proxy", "server": "203.0.113.5:50000", "access_key": "KEY",
     "mtu": 1400, "mux": {"enabled": true, "sessions": 2}, "keepalive_interval": 5},
    {"type": "direct", "tag": "direct"},
    {"type": "block", "tag": "block"}
  ],
  "routing": {
    "rules": [{"domain_suffix": ["trusted-site.com", "local.lan"], "outbound": "direct"}],
    "default_outbound": "proxy"
  }
}"""


def test_issue_example_loads() -> None:
    config, warnings = parse_config_text(ISSUE_EXAMPLE)
    assert warnings == []
    ostp = config.outbounds[0]
    assert isinstance(ostp, OstpOutboundConfig)
    assert ostp.access_key.get_secret_value() == "KEY"
    assert config.mux_for(ostp).sessions == 2
    assert config.default_outbound == "proxy"
    assert config.control.socket is None


def test_secrets_never_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    config, _ = parse_config_text(ISSUE_EXAMPLE)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("config %s %r", config, config)
    assert '"KEY"' not in caplog.text and "'KEY'" not in caplog.text
    assert "'p'" not in repr(config)
    assert "KEY" not in dump_config(config, reveal_secrets=False)
    assert '"access_key": "KEY"' in dump_config(config)


def test_canonical_dump_round_trips() -> None:
    config, _ = parse_config_text(ISSUE_EXAMPLE)
    again, _ = parse_config_text(dump_config(config))
    assert again == config


def test_top_level_mux_is_the_default() -> None:
    config, _ = config_from_data(
        {
            "mux": {"enabled": True, "sessions": 3},
            "outbounds": [{"type": "ostp", "server": "h:1", "access_key": "k"}],
        }
    )
    ostp = config.outbounds[0]
    assert isinstance(ostp, OstpOutboundConfig)
    assert config.mux_for(ostp).sessions == 3


def _issues(data: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config_from_data(data, "cfg.json")
    assert "cfg.json" in str(info.value)
    return {issue.path: issue.message for issue in info.value.issues}


def test_errors_name_each_field_by_path() -> None:
    issues = _issues(
        {
            "inbounds": [{"type": "local_proxy", "port": "x", "listn": "1"}],
            "outbounds": [
                {"type": "ostp", "server": "nohost", "access_key": ""},
                {"type": "socks"},
                {"type": "direct", "connect_timeout": -1},
            ],
            "routing": {"rules": [{"domain": "a", "outbond": "x"}]},
        }
    )
    assert "valid integer" in issues["inbounds[0].port"]
    assert "did you mean 'listen'" in issues["inbounds[0].listn"]
    assert "missing port" in issues["outbounds[0].server"]
    assert "empty" in issues["outbounds[0].access_key"]
    assert "unknown type 'socks'" in issues["outbounds[1]"]
    assert "greater than 0" in issues["outbounds[2].connect_timeout"]
    assert "missing" in issues["routing.rules[0].outbound"]
    assert "did you mean 'outbound'" in issues["routing.rules[0].outbond"]


def test_reference_errors() -> None:
    issues = _issues(
        {
            "outbounds": [{"type": "direct"}, {"type": "direct"}],
            "routing": {
                "rules": [
                    {"domain": ["a"], "outbound": "nope"},
                    {"outbound": "direct"},
                    {"inbound": "other", "outbound": "direct"},
                ],
                "default_outbound": "zz",
            },
        }
    )
    assert "duplicate tag 'direct'" in issues["outbounds[1].tag"]
    assert "no outbound is tagged 'nope'" in issues["routing.rules[0].outbound"]
    assert "at least one condition" in issues["routing.rules[1]"]
    assert "no inbound is tagged 'other'" in issues["routing.rules[2].inbound"]
    assert "'zz'" in issues["routing.default_outbound"]


def test_every_bad_item_of_every_list_is_reported_with_the_reference_errors() -> None:
    issues = _issues(
        {
            "inbounds": [
                {
                    "type": "local_proxy",
                    "tag": "a",
                    "users": [
                        {"username": "bob", "password": "1"},
                        {"username": "ann", "password": "2"},
                        {"username": "bob", "password": "3"},
                        {"username": "ann", "password": "4"},
                    ],
                },
                {
                    "type": "tun",
                    "address": ["198.18.0.1/30", "bad", "also-bad"],
                    "exclude_routes": ["x", "10.0.0.0/8", "y"],
                },
            ],
            "outbounds": [
                {"type": "direct"},
                {
                    "type": "ostp",
                    "server": "h:1",
                    "access_key": "k",
                    "nat": {"stun": ["stun.example:3478", "h:x", "[::1"]},
                },
            ],
            "routing": {
                "rules": [
                    {
                        "ip_cidr": ["10.0.0.0/8", "bogus", "1.2.3.4", "300.1.1.1/8"],
                        "port_range": ["1-2", "9-1", "x"],
                        "domain_regex": ["(", "ok", "[a"],
                        "outbound": "nowhere",
                    },
                    {"inbound": "nothing", "outbound": "direct"},
                ],
            },
        }
    )
    assert "'bogus' is not an IP address or CIDR" in issues["routing.rules[0].ip_cidr[1]"]
    assert "'300.1.1.1/8'" in issues["routing.rules[0].ip_cidr[3]"]
    assert "routing.rules[0].ip_cidr[0]" not in issues
    assert "'9-1'" in issues["routing.rules[0].port_range[1]"]
    assert "'x'" in issues["routing.rules[0].port_range[2]"]
    assert "regular expression" in issues["routing.rules[0].domain_regex[0]"]
    assert "regular expression" in issues["routing.rules[0].domain_regex[2]"]
    assert "'bad'" in issues["inbounds[1].address[1]"]
    assert "'also-bad'" in issues["inbounds[1].address[2]"]
    assert "'x'" in issues["inbounds[1].exclude_routes[0]"]
    assert "'y'" in issues["inbounds[1].exclude_routes[2]"]
    assert "outbounds[1].nat.stun[1]" in issues and "outbounds[1].nat.stun[2]" in issues
    users = issues["inbounds[0].users"]
    assert "users[2] repeats users[0] ('bob')" in users
    assert "users[3] repeats users[1] ('ann')" in users
    # cross references are checked even though fields are invalid elsewhere
    assert (
        "no outbound is tagged 'nowhere' (have 'direct', 'proxy')"
        in issues["routing.rules[0].outbound"]
    )
    assert "no inbound is tagged 'nothing'" in issues["routing.rules[1].inbound"]
    assert len(issues) == 15, sorted(issues)


def _two_proxies(listen_a: str, port_a: int, listen_b: str, port_b: int) -> dict[str, Any]:
    return {
        "inbounds": [
            {"type": "local_proxy", "tag": "a", "listen": listen_a, "port": port_a},
            {"type": "local_proxy", "tag": "b", "listen": listen_b, "port": port_b},
        ],
        "outbounds": [{"type": "direct"}],
    }


@pytest.mark.parametrize(
    ("listen_a", "listen_b", "collide"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),
        ("127.0.0.2", "0.0.0.0", True),
        ("::", "::1", True),
        ("::", "::", True),
        ("localhost", "::1", True),
        ("localhost", "127.0.0.1", True),
        ("::", "0.0.0.0", False),  # the daemon binds :: as IPv6 only
        ("127.0.0.1", "127.0.0.2", False),
        ("::1", "127.0.0.1", False),
    ],
)
def test_two_inbounds_on_one_address_and_port(listen_a: str, listen_b: str, collide: bool) -> None:
    data = _two_proxies(listen_a, 2000, listen_b, 2000)
    if not collide:
        config_from_data(data)
        return
    message = _issues(data)["inbounds[1].port"]
    assert "collides with inbounds[0]" in message
    assert str(2000) in message
    config_from_data(_two_proxies(listen_a, 2000, listen_b, 2001))  # other ports: fine
    config_from_data(_two_proxies(listen_a, 0, listen_b, 0))  # 0 picks a free port each


def test_two_default_inbounds_collide() -> None:
    issues = _issues(
        {
            "inbounds": [{"type": "local_proxy", "tag": "a"}, {"type": "local_proxy"}],
            "outbounds": [{"type": "direct"}],
        }
    )
    assert issues["inbounds[1].port"].startswith("127.0.0.1:1088 collides with inbounds[0]")


def test_secret_values_are_not_echoed_in_errors() -> None:
    issues = _issues({"outbounds": [{"type": "ostp", "server": "h:1", "access_key": 12345678}]})
    assert "12345678" not in json.dumps(issues)


def test_bad_json_reports_line_and_column() -> None:
    with pytest.raises(ConfigError, match="line 3 column"):
        parse_config_text('{\n  // c\n  "outbounds": [,]\n}')


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(alphabet='ab/*"\\\n x'),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(alphabet="ab/*", max_size=4), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_comment_stripping_keeps_json_strings(value: Any) -> None:
    text = "// head\n" + json.dumps(value, indent=1) + " /* tail */"
    assert json.loads(strip_json_comments(text)) == value


FLAT = """{
  "mode": "client", // upstream client config, spec §10.10
  "server": "198.51.100.7:50000",
  "access_key": "abcdef",
  "socks5_bind": "127.0.0.1:1999",
  "mtu": 1280,
  "debug": true,
  "mux": {"enabled": true, "sessions": 4},
  "exclude": {"domains": [".corp.example", "lan"], "ips": ["10.0.0.0/8", "192.168.1.1"],
              "processes": ["x.exe"]},
  "tun": {"enable": false},
  "transport": {"mode": "udp"},
  "unknown_key": 1
}"""


def test_flat_config_is_converted() -> None:
    config, warnings = parse_config_text(FLAT)
    ostp = config.outbound("proxy")
    assert isinstance(ostp, OstpOutboundConfig)
    assert ostp.server == "198.51.100.7:50000"
    assert ostp.mtu == 1280
    assert config.mux_for(ostp).sessions == 4
    inbound = config.inbounds[0]
    assert isinstance(inbound, LocalProxyInboundConfig)
    assert (inbound.listen, inbound.port) == ("127.0.0.1", 1999)
    assert config.log.level == "debug"
    rules = config.routing.rules
    assert isinstance(rules[0], RoutingRule) and isinstance(rules[1], RoutingRule)
    assert rules[0].domain_suffix == ["corp.example", "lan"]
    assert rules[0].outbound == rules[1].outbound == "direct"
    assert rules[1].ip_cidr == ["10.0.0.0/8", "192.168.1.1"]
    assert config.default_outbound == "proxy"
    assert any("processes" in w for w in warnings)


def test_flat_config_errors_use_flat_names() -> None:
    issues = _issues({"mode": "client", "server": "x", "access_key": "k"})
    assert "missing port" in issues["server"]
    issues = _issues({"mode": "server", "server": "x:1", "access_key": "k"})
    assert "mode" in issues
    issues = _issues({"mode": "client", "access_key": "k"})
    assert "missing" in issues["server"]


def test_flat_config_reports_every_problem_by_its_flat_name() -> None:
    issues = _issues(
        {
            "mode": "client",
            "socks5_bind": "nonsense",
            "mtu": 10,
            "mux": {"enabled": True, "sessions": 0},
            "exclude": {"ips": ["10.0.0.0/8", "", "bad", "1.1.1.1", "worse"], "domains": 5},
        }
    )
    assert "missing" in issues["server"] and "missing" in issues["access_key"]
    assert "socks5_bind" in issues and "mtu" in issues
    assert "greater than or equal to 1" in issues["mux.sessions"]
    assert "'bad'" in issues["exclude.ips[2]"]  # the index in the flat list
    assert "'worse'" in issues["exclude.ips[4]"]
    assert "expected a list" in issues["exclude.domains"]
    assert len(issues) == 8, sorted(issues)
    issues = _issues({"mode": "server", "access_key": "k", "mux": 3, "exclude": []})
    assert {"mode", "server", "mux"} <= set(issues)


def test_share_link() -> None:
    link = "ostp://0123abcd%41@example.net:50000?type=udp&sni=www.example.com#My%20server"
    parsed = parse_share_link(link)
    assert parsed.access_key == "0123abcd%41"  # taken as written (spec §10.9)
    assert (parsed.host, parsed.port, parsed.name) == ("example.net", 50000, "My server")
    outbound = ostp_outbound_from_share_link(link)
    assert outbound.server == "example.net:50000"
    assert outbound.access_key.get_secret_value() == "0123abcd%41"
    assert ostp_outbound_from_share_link("ostp://k@[2001:db8::1]:443").server == (
        "[2001:db8::1]:443"
    )
    config, warnings = config_from_share_link("ostp://k@h:1?type=udp&tun=true")
    assert isinstance(config, ClientConfig)
    first = config.inbounds[0]
    assert isinstance(first, LocalProxyInboundConfig)
    assert first.port == 1088
    assert [o.type for o in config.outbounds] == ["ostp", "direct", "block"]
    assert warnings


@pytest.mark.parametrize(
    "link", ["http://k@h:1", "ostp://h:1", "ostp://@h:1", "ostp://k@h", "ostp://k@h:99999"]
)
def test_bad_share_links(link: str) -> None:
    with pytest.raises(ValueError):
        parse_share_link(link)


def test_json_schema_describes_the_models() -> None:
    schema = config_json_schema()
    assert schema["title"] == "ostp-client configuration"
    text = json.dumps(schema)
    for name in ("local_proxy", "ostp", "direct", "block", "domain_suffix", "keepalive_interval"):
        assert name in text
