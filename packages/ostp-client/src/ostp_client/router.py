"""Rule routing: which outbound a connection takes, and which rule said so.

Rules are compiled once from `RoutingConfig`: exact domains and suffixes into sets (a suffix
lookup walks the labels of the name, so it costs one set probe per label), CIDRs into
`ipaddress` networks, port ranges into tuples. Within a rule every condition must match (AND);
the values inside one condition are alternatives (OR). The first matching rule wins; otherwise
`default_outbound`. Each rule counts its hits.

Domain conditions never match an IP destination and `ip_cidr` never matches a domain
destination (names are not resolved for routing).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ostp_client.config import RoutingConfig, RoutingRule, parse_port_range
from ostp_client.outbounds.base import Address, Network

__all__ = ["RouteDecision", "Router", "RoutingError"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RoutingError(ValueError):
    """The routing config refers to something that does not exist."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    outbound_tag: str
    rule_index: int | None
    """Index into `routing.rules` of the rule that matched; None for `default_outbound`."""


@dataclass(frozen=True, slots=True)
class _Query:
    domain: str | None
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    port: int
    network: Network
    inbound: str


_Check = Callable[[_Query], bool]


def _normalize_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _suffixes(domain: str) -> Iterable[str]:
    """`a.b.c` → `a.b.c`, `b.c`, `c`."""
    yield domain
    start = domain.find(".")
    while start >= 0:
        yield domain[start + 1 :]
        start = domain.find(".", start + 1)


def _compile_rule(rule: RoutingRule) -> tuple[_Check, ...]:
    checks: list[_Check] = []
    if rule.domain is not None:
        exact = frozenset(_normalize_domain(d) for d in rule.domain)
        checks.append(lambda q: q.domain is not None and q.domain in exact)
    if rule.domain_suffix is not None:
        # spec §10.8: a leading '.' is ignored; equal to the suffix or ends with ".suffix"
        suffixes = frozenset(_normalize_domain(d).lstrip(".") for d in rule.domain_suffix)
        checks.append(
            lambda q: q.domain is not None and any(s in suffixes for s in _suffixes(q.domain))
        )
    if rule.domain_keyword is not None:
        keywords = tuple(k.lower() for k in rule.domain_keyword)
        checks.append(lambda q: q.domain is not None and any(k in q.domain for k in keywords))
    if rule.domain_regex is not None:
        pattern = re.compile("|".join(f"(?:{r})" for r in rule.domain_regex))
        checks.append(lambda q: q.domain is not None and pattern.search(q.domain) is not None)
    if rule.ip_cidr is not None:
        v4: list[IPNetwork] = []
        v6: list[IPNetwork] = []
        for text in rule.ip_cidr:
            net = ipaddress.ip_network(text, strict=False)
            (v4 if net.version == 4 else v6).append(net)
        nets4, nets6 = tuple(v4), tuple(v6)

        def _ip(q: _Query) -> bool:
            if q.ip is None:
                return False
            ip = q.ip
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return any(ip in net for net in (nets4 if ip.version == 4 else nets6))

        checks.append(_ip)
    if rule.port is not None or rule.port_range is not None:
        ports = frozenset(rule.port or ())
        ranges = tuple(parse_port_range(r) for r in rule.port_range or ())
        if rule.port is not None:
            checks.append(lambda q: q.port in ports)
        if rule.port_range is not None:
            checks.append(lambda q: any(lo <= q.port <= hi for lo, hi in ranges))
    if rule.network is not None:
        networks = frozenset(rule.network)
        checks.append(lambda q: q.network in networks)
    if rule.inbound is not None:
        inbounds = frozenset(rule.inbound)
        checks.append(lambda q: q.inbound in inbounds)
    return tuple(checks)


class Router:
    """Compiled routing rules. `route()` is synchronous and allocation-light."""

    def __init__(self, config: RoutingConfig, outbound_tags: Iterable[str]) -> None:
        tags = list(outbound_tags)
        if not tags:
            raise RoutingError("no outbounds")
        known = set(tags)
        self.default_outbound = config.default_outbound or tags[0]
        if self.default_outbound not in known:
            raise RoutingError(
                f"routing.default_outbound: no outbound is tagged {self.default_outbound!r}"
            )
        for index, rule in enumerate(config.rules):
            if rule.outbound not in known:
                raise RoutingError(
                    f"routing.rules[{index}].outbound: no outbound is tagged {rule.outbound!r}"
                )
        self._rules = tuple((_compile_rule(rule), rule.outbound) for rule in config.rules)
        self.rule_hits = [0] * len(self._rules)
        self.default_hits = 0

    def route(self, destination: Address, network: Network, inbound: str) -> RouteDecision:
        ip = destination.ip
        query = _Query(
            domain=_normalize_domain(destination.host) if ip is None else None,
            ip=ip,
            port=destination.port,
            network=network,
            inbound=inbound,
        )
        for index, (checks, outbound) in enumerate(self._rules):
            if all(check(query) for check in checks):
                self.rule_hits[index] += 1
                return RouteDecision(outbound, index)
        self.default_hits += 1
        return RouteDecision(self.default_outbound, None)

    def stats(self) -> dict[str, object]:
        return {"rule_hits": list(self.rule_hits), "default_hits": self.default_hits}
