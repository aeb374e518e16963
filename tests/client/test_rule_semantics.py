"""Rule semantics, table-driven against sing-box's documentation and its own test cases.

The default-rule logic is the formula of sing-box's route-rule documentation ("Default
Fields"); the rule-set cases are those of sing-box's route/rule/rule_set_semantics_test.go
(metadata: TCP, source 10.0.0.1:1000, destination www.example.com:443).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from ostp_client.config import (
    ClientConfig,
    HeadlessRuleConfig,
    RouteRuleConfig,
    RoutingConfig,
    RuleSetConfig,
    config_from_data,
)
from ostp_client.flow import Address, Network
from ostp_client.router import Query, Router, compile_rule, compile_rule_set, match_rule
from ostp_client.rule_migration import keep_old_rule_meaning, rule_meaning_changes
from ostp_client.rule_set import RuleSetFile

RULE: TypeAdapter[Any] = TypeAdapter(HeadlessRuleConfig)


def q(
    host: str = "www.example.com",
    port: int = 443,
    network: Network = "tcp",
    source: str = "10.0.0.1:1000",
    inbound: str = "in",
) -> Query:
    return Query(
        Address.parse(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"),
        network,
        inbound,
        Address.parse(source),
    )


def matches(rule: dict[str, Any], query: Query, sets: dict[str, list[Any]] | None = None) -> bool:
    table = {}
    for tag, rules in (sets or {}).items():
        file: RuleSetFile[Any] = RuleSetFile(
            RuleSetConfig(tag=tag, path="unused.json"), Path("."), compile_rule_set
        )
        file.compiled = compile_rule_set([RULE.validate_python(r) for r in rules])
        table[tag] = file
    return match_rule(RULE.validate_python(rule), query, table)


# (rule, query, expected): the documented grouping
#   (domain || domain_suffix || domain_keyword || domain_regex || ip_cidr || ip_is_private) &&
#   (port || port_range) && (source_ip_cidr || source_ip_is_private) &&
#   (source_port || source_port_range) && other fields
DEFAULT_RULE_TABLE: list[tuple[dict[str, Any], Query, bool]] = [
    # destination-address kinds are alternatives
    ({"domain_suffix": ["example.com"], "ip_cidr": ["203.0.113.0/24"]}, q(), True),
    ({"domain_suffix": ["example.com"], "ip_cidr": ["203.0.113.0/24"]}, q("203.0.113.9"), True),
    ({"domain_suffix": ["example.com"], "ip_cidr": ["203.0.113.0/24"]}, q("198.51.100.1"), False),
    ({"domain": ["other.test"], "domain_keyword": ["exam"]}, q(), True),
    ({"domain": ["other.test"], "domain_regex": [r"^www\."]}, q(), True),
    ({"domain": ["other.test"], "domain_regex": [r"^mail\."]}, q(), False),
    ({"ip_is_private": True}, q("10.1.2.3"), True),
    ({"ip_is_private": True}, q("203.0.113.9"), True),  # TEST-NET-3 is not global
    ({"ip_is_private": True}, q("8.8.8.8"), False),
    ({"ip_is_private": True, "domain": ["www.example.com"]}, q(), True),
    # port kinds are alternatives; the groups are ANDed
    ({"port": [80], "port_range": ["400:500"]}, q(), True),
    ({"port": [80], "port_range": ["1000:2000"]}, q(), False),
    ({"port_range": [":500"]}, q(), True),
    ({"port_range": ["444:"]}, q(), False),
    ({"domain_suffix": ["example.com"], "port": [443]}, q(), True),
    ({"domain_suffix": ["example.com"], "port": [80]}, q(), False),
    ({"domain_suffix": ["other.test"], "port": [443]}, q(), False),
    # source groups
    ({"source_ip_cidr": ["10.0.0.0/8"], "source_port": [1000]}, q(), True),
    ({"source_ip_cidr": ["10.0.0.0/8"], "source_port": [2000]}, q(), False),
    ({"source_port": [2000], "source_port_range": ["900:1100"]}, q(), True),
    ({"source_ip_is_private": True}, q(source="127.0.0.1:5000"), True),
    ({"source_ip_is_private": False}, q(source="127.0.0.1:5000"), False),
    # other fields are ANDed with everything
    ({"domain_suffix": ["example.com"], "network": ["udp"]}, q(), False),
    ({"domain_suffix": ["example.com"], "network": ["tcp"], "inbound": ["in"]}, q(), True),
    ({"domain_suffix": ["example.com"], "inbound": ["other"]}, q(), False),
    # invert
    ({"domain_suffix": ["example.com"], "invert": True}, q(), False),
    ({"domain_suffix": ["other.test"], "invert": True}, q(), True),
    ({"port": [80], "domain": ["www.example.com"], "invert": True}, q(), True),
    # a domain condition never matches an IP destination, ip_cidr never a name
    ({"domain_keyword": ["1"]}, q("10.1.1.1"), False),
    ({"ip_cidr": ["0.0.0.0/0"]}, q(), False),
    ({"ip_cidr": ["::/0"]}, q("2001:db8::1"), True),
    ({"ip_cidr": ["10.0.0.0/8"]}, q("::ffff:10.0.0.1"), True),
    # logical rules
    ({"type": "logical", "mode": "and", "rules": [{"port": [443]}, {"network": "tcp"}]}, q(), True),
    (
        {"type": "logical", "mode": "and", "rules": [{"port": [443]}, {"network": "udp"}]},
        q(),
        False,
    ),
    ({"type": "logical", "mode": "or", "rules": [{"port": [80]}, {"network": "tcp"}]}, q(), True),
    ({"type": "logical", "mode": "or", "rules": [{"port": [80]}, {"network": "udp"}]}, q(), False),
    (
        {"type": "logical", "mode": "or", "rules": [{"port": [80]}], "invert": True},
        q(),
        True,
    ),
    (
        {
            "type": "logical",
            "mode": "and",
            "rules": [
                {"domain_suffix": ["example.com"]},
                {"type": "logical", "mode": "or", "rules": [{"port": [80]}, {"port": [443]}]},
            ],
        },
        q(),
        True,
    ),
]


@pytest.mark.parametrize(("rule", "query", "expected"), DEFAULT_RULE_TABLE)
def test_documented_default_rule_logic(rule: dict[str, Any], query: Query, expected: bool) -> None:
    assert matches(rule, query) is expected


def _route(rule: dict[str, Any], query: Query, *sets: list[dict[str, Any]]) -> bool:
    tags = {f"s{i}": list(rules) for i, rules in enumerate(sets)}
    return matches({**rule, "rule_set": list(tags)}, query, tags)


# sing-box route/rule/rule_set_semantics_test.go, case by case: (name, outer rule without its
# rule_set, the referenced sets' rules, expected)
RULE_SET_TABLE: list[tuple[str, dict[str, Any], list[list[dict[str, Any]]], bool]] = [
    # TestRouteRuleSetMergeDestinationAddressGroup
    ("merge domain", {"ip_cidr": ["203.0.113.0/24"]}, [[{"domain": ["www.example.com"]}]], True),
    ("merge suffix", {"ip_cidr": ["203.0.113.0/24"]}, [[{"domain_suffix": ["example.com"]}]], True),
    ("merge keyword", {"ip_cidr": ["203.0.113.0/24"]}, [[{"domain_keyword": ["example"]}]], True),
    (
        "merge regex",
        {"ip_cidr": ["203.0.113.0/24"]},
        [[{"domain_regex": [r"^www\.example\.com$"]}]],
        True,
    ),
    # TestRouteRuleSetMergeSourceAndPortGroups
    (
        "source address",
        {"source_ip_cidr": ["198.51.100.0/24"]},
        [[{"source_ip_cidr": ["10.0.0.0/8"]}]],
        True,
    ),
    ("destination port", {"port": [8443]}, [[{"port": [443]}]], True),
    ("destination port range", {"port": [8443]}, [[{"port_range": ["400:500"]}]], True),
    ("source port", {"source_port": [2000]}, [[{"source_port": [1000]}]], True),
    ("source port range", {"source_port": [2000]}, [[{"source_port_range": ["900:1100"]}]], True),
    # TestRouteRuleSetOuterGroupedStateMergesIntoSameGroup
    (
        "outer destination",
        {"domain_suffix": ["example.com"]},
        [[{"domain_suffix": ["google.com"]}]],
        True,
    ),
    (
        "outer source address",
        {"source_ip_cidr": ["10.0.0.0/8"]},
        [[{"source_ip_cidr": ["198.51.100.0/24"]}]],
        True,
    ),
    ("outer source port", {"source_port": [1000]}, [[{"source_port": [2000]}]], True),
    ("outer destination port", {"port": [443]}, [[{"port": [8443]}]], True),
    # TestRouteRuleSetOtherFieldsStayAnd
    ("other fields stay and", {"network": ["udp"]}, [[{"domain_suffix": ["example.com"]}]], False),
    # TestRouteRuleSetMergedBranchKeepsAndConstraints
    (
        "inner non-grouped condition",
        {"domain_suffix": ["example.com"]},
        [[{"network": ["udp"]}]],
        False,
    ),
    (
        "different grouped branch",
        {"source_port": [1000]},
        [[{"domain_suffix": ["google.com"]}]],
        False,
    ),
    # TestRouteRuleSetOrSemantics
    (
        "later ruleset can satisfy outer group",
        {"ip_cidr": ["203.0.113.0/24"]},
        [[{"network": ["tcp"]}], [{"domain_suffix": ["example.com"]}]],
        True,
    ),
    (
        "multi rule set does not satisfy outer group",
        {"ip_cidr": ["203.0.113.0/24"]},
        [[{"network": ["tcp"]}, {"domain_suffix": ["example.com"]}]],
        False,
    ),
    (
        "cross ruleset union is not allowed",
        {"source_port": [2000], "ip_cidr": ["203.0.113.0/24"]},
        [[{"source_port": [1000]}], [{"domain_suffix": ["example.com"]}]],
        False,
    ),
    # TestRouteRuleSetLogicalSemantics
    (
        "logical set does not satisfy outer group",
        {"ip_cidr": ["203.0.113.0/24"]},
        [
            [
                {
                    "type": "logical",
                    "mode": "or",
                    "rules": [{"network": ["tcp"]}, {"domain_suffix": ["example.com"]}],
                }
            ]
        ],
        False,
    ),
    (
        "logical branch does not lift outer group requirements",
        {"ip_cidr": ["203.0.113.0/24"], "source_port": [2000]},
        [
            [
                {
                    "type": "logical",
                    "mode": "and",
                    "rules": [{"domain_suffix": ["example.com"]}, {"source_port": [1000]}],
                }
            ]
        ],
        False,
    ),
    (
        "logical branch matches on its own conditions",
        {"source_port": [1000]},
        [
            [
                {
                    "type": "logical",
                    "mode": "and",
                    "rules": [{"domain_suffix": ["example.com"]}, {"source_port": [1000]}],
                }
            ]
        ],
        True,
    ),
    (
        "inverted set does not satisfy outer group",
        {"ip_cidr": ["203.0.113.0/24"]},
        [[{"domain_suffix": ["cn"], "invert": True}]],
        False,
    ),
    # a rule with only rule_set matches what the set matches
    ("set alone", {}, [[{"domain_suffix": ["example.com"]}]], True),
    ("set alone, miss", {}, [[{"domain_suffix": ["example.org"]}]], False),
]


@pytest.mark.parametrize(
    ("name", "outer", "sets", "expected"), RULE_SET_TABLE, ids=[c[0] for c in RULE_SET_TABLE]
)
def test_sing_box_rule_set_semantics(
    name: str, outer: dict[str, Any], sets: list[list[dict[str, Any]]], expected: bool
) -> None:
    assert _route(outer, q(), *sets) is expected


def test_rule_set_runs_are_merged_without_changing_first_match() -> None:
    """Plain domain rules merge only in runs, so a rule before them still decides first."""
    rules = [
        RULE.validate_python(r)
        for r in (
            {"domain": ["a.test"]},
            {"domain_suffix": ["b.test"]},
            {"network": ["tcp"]},
            {"domain": ["www.example.com"]},
        )
    ]
    compiled = compile_rule_set(rules)
    assert len(compiled) == 3  # [a+b merged], network, [www.example.com]
    # the network rule matches first and carries no destination state: the outer ip_cidr
    # group stays unsatisfied (as "multi rule set does not satisfy outer group")
    assert not _route(
        {"ip_cidr": ["203.0.113.0/24"]},
        q(),
        [
            {"domain": ["a.test"]},
            {"domain_suffix": ["b.test"]},
            {"network": ["tcp"]},
            {"domain": ["www.example.com"]},
        ],
    )


# --------------------------------------------------------------------------------------------
# the old meaning (every condition ANDed) and its rewrite


def _old_match(rule: dict[str, Any], query: Query) -> bool:
    """The previous semantics: every condition must match (reference implementation)."""
    conditions = {k: v for k, v in rule.items() if k != "outbound"}
    return all(match_rule(RULE.validate_python({k: v}), query) for k, v in conditions.items())


CONDITIONS = {
    "domain": ["a.test", "www.example.com"],
    "domain_suffix": ["example.com"],
    "domain_keyword": ["exam"],
    "domain_regex": [r"^a\."],
    "ip_cidr": ["10.0.0.0/8"],
    "port": [443],
    "port_range": ["80:90"],
    "network": ["tcp"],
}
QUERIES = [
    q(),
    q("a.test", 80),
    q("10.1.1.1", 85),
    q("10.1.1.1", 443),
    q("b.example.com", 81, "udp"),
    q("a.test", 443),
    q("192.0.2.1", 443),
]


@given(st.sets(st.sampled_from(sorted(CONDITIONS)), min_size=1))
def test_keep_old_rule_meaning_matches_exactly_as_before(names: set[str]) -> None:
    rule = {name: CONDITIONS[name] for name in names}
    config, _ = config_from_data(
        {
            "outbounds": [{"type": "direct", "tag": "d"}],
            "routing": {"rules": [{**rule, "outbound": "d"}]},
        }
    )
    changed = rule_meaning_changes(config)
    rewritten, done = keep_old_rule_meaning(config)
    assert [c.index for c in done] == [c.index for c in changed]
    new_rule = rewritten.routing.rules[0]
    for query in QUERIES:
        old = _old_match(rule, query)
        assert match_rule(new_rule, query) is old
        if not changed:  # the rule's meaning did not change: the new semantics agree
            assert match_rule(config.routing.rules[0], query) is old


def test_meaning_change_is_reported_for_two_kinds_of_one_group() -> None:
    config, _ = config_from_data(
        {
            "outbounds": [{"type": "direct", "tag": "d"}],
            "routing": {
                "rules": [
                    {"domain_suffix": ["a.test"], "ip_cidr": ["10.0.0.0/8"], "outbound": "d"},
                    {"domain_suffix": ["a.test"], "port": [443], "outbound": "d"},
                    {"port": [443], "port_range": ["80:90"], "outbound": "d"},
                ]
            },
        }
    )
    changes = rule_meaning_changes(config)
    assert [c.index for c in changes] == [0, 2]
    assert "domain_suffix or ip_cidr" in changes[0].message()
    assert "--keep-old-rule-meaning" in changes[0].message()


def test_router_routes_by_first_matching_rule_with_new_semantics() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(list[RouteRuleConfig])
    rules = adapter.validate_python(
        [
            {"domain_suffix": ["example.com"], "ip_cidr": ["10.0.0.0/8"], "outbound": "a"},
            {
                "type": "logical",
                "mode": "or",
                "rules": [{"port": 80}, {"port": 81}],
                "outbound": "b",
            },
        ]
    )
    router = Router(RoutingConfig(rules=rules, default_outbound="c"), ["a", "b", "c"])
    assert router.route(Address("10.2.3.4", 443), "tcp", "in").outbound_tag == "a"
    assert router.route(Address("www.example.com", 1), "tcp", "in").outbound_tag == "a"
    assert router.route(Address("192.0.2.1", 81), "tcp", "in").outbound_tag == "b"
    assert router.route(Address("192.0.2.1", 82), "tcp", "in").rule_index is None
    assert router.rule_hits == [2, 1]


def test_compile_rule_accepts_every_documented_field() -> None:
    rule = RULE.validate_python(
        {
            "domain": "a.test",
            "domain_suffix": ".b.test",
            "domain_keyword": "k",
            "domain_regex": "^r",
            "ip_cidr": "10.0.0.0/8",
            "ip_is_private": False,
            "port": 1,
            "port_range": "2:3",
            "source_ip_cidr": "127.0.0.0/8",
            "source_ip_is_private": True,
            "source_port": 4,
            "source_port_range": "5:",
            "network": "tcp",
            "inbound": "in",
            "process_name": "curl",
            "process_path": "/usr/bin/curl",
            "invert": False,
        }
    )
    compile_rule(rule)
    assert isinstance(ClientConfig, type)


def test_check_warns_and_format_keeps_the_old_meaning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from ostp_client.cli import main

    path = tmp_path / "cfg.json"
    path.write_text(
        json.dumps(
            {
                "outbounds": [{"type": "direct", "tag": "d"}, {"type": "block", "tag": "b"}],
                "routing": {
                    "rules": [
                        {"domain_suffix": ["a.test"], "ip_cidr": ["10.0.0.0/8"], "outbound": "b"},
                        {"domain_suffix": ["c.test"], "port": [443], "outbound": "b"},
                    ]
                },
            }
        )
    )
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: routing.rules[0]: now matches when any of domain_suffix or ip_cidr" in err
    assert "routing.rules[1]" not in err
    assert main(["format", "-c", str(path), "--keep-old-rule-meaning"]) == 0
    assert "routing.rules[0]: rewritten as a logical AND rule" in capsys.readouterr().err
    rules = json.loads(path.read_text())["routing"]["rules"]
    assert rules[0] == {
        "type": "logical",
        "mode": "and",
        "rules": [{"domain_suffix": ["a.test"]}, {"ip_cidr": ["10.0.0.0/8"]}],
        "outbound": "b",
    }
    assert rules[1] == {"domain_suffix": ["c.test"], "port": [443], "outbound": "b"}
    assert main(["check", "-c", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err
