"""Routing: each matcher picks its outbound, visible at the origin as the source address."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.config import RoutingConfig, RoutingRule
from ostp_client.flow import Address
from ostp_client.router import Router, RoutingError
from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


# (rule, request host, request port, via inbound); rule i routes through outbound "o<i>",
# which connects from 127.0.0.<10+i>, so the origin sees which rule fired.
RULES: list[dict[str, Any]] = [
    {"domain": ["exact.test"]},
    {"domain_suffix": ["suffix.test"]},
    {"domain_keyword": ["keyword"]},
    {"domain_regex": [r"^re[0-9]+\.test$"]},
    {"port": [81]},
    {"port_range": ["1000-2000"]},
    {"domain_suffix": ["and.test"], "port": [8080]},
    {"ip_cidr": ["127.0.0.0/8"]},
    {"network": ["udp"]},
    {"inbound": ["other-in"]},
]


def _routing_config(origin_port: int) -> dict[str, Any]:
    outbounds = [
        {
            "type": "direct",
            "tag": f"o{i}",
            "bind_address": f"127.0.0.{10 + i}",
            "override_address": "127.0.0.1",
            "override_port": origin_port,
        }
        for i in range(len(RULES))
    ]
    outbounds.append(
        {
            "type": "direct",
            "tag": "fallback",
            "bind_address": "127.0.0.99",
            "override_address": "127.0.0.1",
            "override_port": origin_port,
        }
    )
    return {
        "inbounds": [
            {"type": "local_proxy", "tag": "proxy-in", "port": 0},
            {"type": "local_proxy", "tag": "other-in", "port": 0},
        ],
        "outbounds": outbounds,
        "routing": {
            "rules": [{**rule, "outbound": f"o{i}"} for i, rule in enumerate(RULES)],
            "default_outbound": "fallback",
        },
    }


CASES = [
    ("exact.test", 80, "proxy-in", 0),
    ("www.suffix.test", 80, "proxy-in", 1),
    ("suffix.test", 80, "proxy-in", 1),
    ("my-keyword-site.test", 80, "proxy-in", 2),
    ("re42.test", 80, "proxy-in", 3),
    ("plain.test", 81, "proxy-in", 4),
    ("plain.test", 1500, "proxy-in", 5),
    ("x.and.test", 8080, "proxy-in", 6),
    ("x.and.test", 80, "proxy-in", None),  # AND: the port does not match
    ("127.0.0.1", 80, "proxy-in", 7),
    ("plain.test", 80, "other-in", 9),
    ("plain.test", 80, "proxy-in", None),
    ("notexact.test", 80, "proxy-in", None),
]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["socks5h", "http"])
async def test_each_rule_routes_to_its_outbound(origin: Origin, mode: str) -> None:
    async with running_daemon(_routing_config(origin.port)) as daemon:
        for host, port, inbound, rule in CASES:
            origin.clear()
            url = f"http://{host}:{port}/whoami"
            result = await curl([*proxy_args(mode, proxy_port(daemon, inbound)), url])
            assert result.returncode == 0, (host, port, result.stderr)
            (entry,) = origin.log()
            expected = "127.0.0.99" if rule is None else f"127.0.0.{10 + rule}"
            assert entry["client"] == expected, (host, port, inbound)
            assert entry["host"].split(":")[0] == host
        hits = daemon.router.rule_hits
        assert hits == [1, 2, 1, 1, 1, 1, 1, 1, 0, 1]
        assert daemon.router.default_hits == 3


def _router(*rules: dict[str, Any], default: str = "d") -> Router:
    config = RoutingConfig(
        rules=[RoutingRule.model_validate(r) for r in rules], default_outbound=default
    )
    return Router(config, ["a", "b", "d"])


def test_first_match_wins_and_reports_rule_index() -> None:
    router = _router(
        {"domain_suffix": ["example.com"], "outbound": "a"},
        {"domain": ["www.example.com"], "outbound": "b"},
    )
    decision = router.route(Address("WWW.Example.COM.", 443), "tcp", "in")
    assert (decision.outbound_tag, decision.rule_index) == ("a", 0)
    decision = router.route(Address("other.org", 443), "tcp", "in")
    assert (decision.outbound_tag, decision.rule_index) == ("d", None)
    assert router.rule_hits == [1, 0]
    assert router.default_hits == 1


def test_domain_rules_never_match_ips_and_cidr_never_matches_names() -> None:
    router = _router(
        {"domain_keyword": ["1"], "outbound": "a"},
        {"ip_cidr": ["10.0.0.0/8", "2001:db8::/32"], "outbound": "b"},
    )
    assert router.route(Address("10.1.2.3", 1), "tcp", "in").outbound_tag == "b"
    assert router.route(Address("2001:db8::1", 1), "tcp", "in").outbound_tag == "b"
    assert router.route(Address("::ffff:10.0.0.1", 1), "tcp", "in").outbound_tag == "b"
    assert router.route(Address("host1.lan", 1), "tcp", "in").outbound_tag == "a"
    assert router.route(Address("11.0.0.1", 1), "tcp", "in").outbound_tag == "d"


def test_network_and_inbound_conditions() -> None:
    router = _router(
        {"network": "udp", "port": 53, "outbound": "a"},
        {"inbound": ["tun-in"], "outbound": "b"},
    )
    assert router.route(Address("1.1.1.1", 53), "udp", "x").outbound_tag == "a"
    assert router.route(Address("1.1.1.1", 53), "tcp", "x").outbound_tag == "d"
    assert router.route(Address("1.1.1.1", 53), "tcp", "tun-in").outbound_tag == "b"


def test_unknown_outbound_is_rejected() -> None:
    with pytest.raises(RoutingError, match=r"rules\[0\]"):
        _router({"domain": ["x"], "outbound": "nope"})
    with pytest.raises(RoutingError, match="default_outbound"):
        _router(default="nope")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)


@given(_domain, st.lists(_domain, min_size=1, max_size=5))
def test_suffix_match_equals_the_naive_definition(host: str, suffixes: list[str]) -> None:
    router = _router({"domain_suffix": suffixes, "outbound": "a"})
    # an IP literal (e.g. 0.0.0.0) is no domain: domain conditions never match it
    naive = not _is_ip(host) and any(host == s or host.endswith("." + s) for s in suffixes)
    assert (router.route(Address(host, 1), "tcp", "i").outbound_tag == "a") == naive


@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_inclusive(a: int, b: int, port: int) -> None:
    low, high = min(a, b), max(a, b)
    router = _router({"port_range": [f"{low}-{high}"], "outbound": "a"})
    assert (router.route(Address("h", port), "tcp", "i").outbound_tag == "a") == (
        low <= port <= high
    )


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_cidr_match_equals_ipaddress(ip: ipaddress.IPv4Address, prefix: int) -> None:
    net = ipaddress.ip_network(f"10.20.30.40/{prefix}", strict=False)
    router = _router({"ip_cidr": [str(net)], "outbound": "a"})
    assert (router.route(Address(str(ip), 1), "tcp", "i").outbound_tag == "a") == (ip in net)
