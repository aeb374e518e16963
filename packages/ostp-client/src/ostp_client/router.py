"""Rule routing: which outbound a connection takes, and which rule said so.

Rules follow sing-box's route-rule semantics, as its documentation states them
(sing-box.sagernet.org/configuration/route/rule/, "Default Fields"):

    (domain || domain_suffix || domain_keyword || domain_regex || geoip || ip_cidr
     || ip_is_private) &&
    (port || port_range) &&
    (source_geoip || source_ip_cidr || source_ip_is_private) &&
    (source_port || source_port_range) &&
    other fields

that is: the values of one condition are alternatives; the conditions of one group are
alternatives (a domain condition and `ip_cidr` in one rule match a destination that satisfies
either); the groups and every other condition (`network`, `inbound`, `process_name`,
`process_path`, `rule_set`) must all match. `invert` negates a rule. A logical rule
(`"type": "logical"`, `mode` `and`/`or`, nested `rules`) combines rules.

`rule_set` follows sing-box's implementation and the cases its tests pin down
(route/rule/rule_abstract.go, rule_set_semantics_test.go): the entries of a referenced set's
rules join the referring rule's groups, so `{"domain_suffix": ["a.com"], "rule_set": ["ads"]}`
matches a.com and every domain of `ads`. Each rule evaluates to a set of "match states" (which
of the four groups matched); the referring rule keeps the states that satisfy every group that
it or the set's rule has. Within one set the first rule that matches decides; several sets are
alternatives, each on its own (one set's source port and another's domain do not add up). A
logical rule matches on its own conditions and never satisfies the referring rule's groups;
an inverted rule neither. The first matching route rule wins; otherwise `default_outbound`.
Each rule counts its hits.

Before this release rules ANDed every condition; `rule_migration` finds the rules whose
meaning changed and can rewrite them (`ostp-client format --keep-old-rule-meaning`).

Domain conditions never match an IP destination and `ip_cidr` never matches a domain
destination (names are not resolved for routing). Process conditions look the local program up
(`process_info`) only when a rule that has them is reached.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ostp_client.config import (
    HeadlessLogicalRule,
    HeadlessRule,
    RoutingConfig,
    parse_port_range,
)
from ostp_client.errors import OstpClientError
from ostp_client.flow import Address, Network
from ostp_client.process_info import ProcessInfo
from ostp_client.rule_set import (
    DomainMatcher,
    IpMatcher,
    RuleSetError,
    RuleSetFile,
    uses_process,
)

__all__ = [
    "ProcessInfo",
    "ProcessLookup",
    "RouteDecision",
    "Router",
    "RoutingError",
    "compile_rule",
    "match_rule",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# match states (sing-box's ruleMatchState bits); a state set is a 16-bit mask of states
SRC_ADDR, SRC_PORT, DST_ADDR, DST_PORT = 1, 2, 4, 8
EMPTY = 1  # the set {0}: matched, no group bits


def _with_base(states: int, base: int) -> int:
    if not states or not base:
        return states
    out = 0
    for state in range(16):
        if states >> state & 1:
            out |= 1 << (state | base)
    return out


class RoutingError(OstpClientError, ValueError):
    """The routing config refers to something that does not exist, or a rule set is bad."""


ProcessLookup = Callable[[Address, Network], "ProcessInfo | None"]
"""(local source address of the connection, network) → the program that owns it."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    outbound_tag: str
    rule_index: int | None
    """Index into `routing.rules` of the rule that matched; None for `default_outbound`."""


def _ip_of(host: str) -> IPAddress | None:
    """The host as an IP address (IPv4-mapped IPv6 as IPv4), or None for a name; cheap for
    names (no exception raised and caught unless the name ends in a digit)."""
    if ":" in host:
        try:  # inet_pton and the packed constructor: several times faster than ip_address()
            v6 = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host))
        except (OSError, ValueError):
            return None
        return v6.ipv4_mapped if v6.ipv4_mapped is not None else v6
    if not host[-1:].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host))
    except (OSError, ValueError):
        return None


class Query:
    """One connection as the rules see it; the owning process is looked up on first use."""

    __slots__ = (
        "_lookup",
        "_process",
        "_process_done",
        "_source",
        "_source_ip",
        "domain",
        "inbound",
        "ip",
        "network",
        "port",
        "source_port",
    )

    def __init__(
        self,
        destination: Address,
        network: Network,
        inbound: str,
        source: Address | None = None,
        lookup: ProcessLookup | None = None,
    ) -> None:
        host = destination.host
        ip = _ip_of(host)
        self.ip = ip
        self.domain = host.strip().rstrip(".").lower() if ip is None else None
        self.port = destination.port
        self.network = network
        self.inbound = inbound
        self.source_port = source.port if source is not None else None
        self._source = source
        self._source_ip: IPAddress | bool | None = False  # False: not parsed yet
        self._lookup = lookup
        self._process: ProcessInfo | None = None
        self._process_done = False

    @property
    def source_ip(self) -> IPAddress | None:
        found = self._source_ip
        if found is False:
            source = self._source
            found = self._source_ip = _ip_of(source.host) if source is not None else None
        assert found is not True
        return found

    @property
    def process(self) -> ProcessInfo | None:
        if not self._process_done:
            self._process_done = True
            if self._lookup is not None and self._source is not None:
                try:
                    self._process = self._lookup(self._source, self.network)
                except OSError as exc:
                    logger.debug("process lookup for %s failed: %s", self._source, exc)
        return self._process


_Item = Callable[[Query], bool]


class _Compiled:
    """A compiled rule: `states(query, inherited)` is its match-state set (0: no match)."""

    __slots__ = ()

    def states(self, q: Query, inherited: int) -> int:
        raise NotImplementedError


class _RuleSetRef:
    """A rule's reference to a rule set; reads the set's current rules at match time."""

    __slots__ = ("file",)

    def __init__(self, file: RuleSetFile[tuple[_Compiled, ...]]) -> None:
        self.file = file

    def states(self, q: Query, base: int) -> int:
        for rule in self.file.compiled:
            states = rule.states(q, base)
            if states:
                return states  # the first rule of the set that matches decides
        return 0


class _DefaultRule(_Compiled):
    __slots__ = (
        "dst_addr",
        "dst_port",
        "empty",
        "invert",
        "items",
        "rule_sets",
        "src_addr",
        "src_port",
    )

    def __init__(
        self,
        dst_addr: list[_Item],
        dst_port: list[_Item],
        src_addr: list[_Item],
        src_port: list[_Item],
        items: list[_Item],
        rule_sets: list[_RuleSetRef],
        invert: bool,
    ) -> None:
        self.dst_addr = tuple(dst_addr)
        self.dst_port = tuple(dst_port)
        self.src_addr = tuple(src_addr)
        self.src_port = tuple(src_port)
        self.items = tuple(items)
        self.rule_sets = tuple(rule_sets)
        self.invert = invert
        self.empty = not (dst_addr or dst_port or src_addr or src_port or items or rule_sets)

    def _fail(self, inherited: int) -> int:
        return _with_base(EMPTY, inherited) if self.invert else 0

    def states(self, q: Query, inherited: int) -> int:
        if self.empty:
            return _with_base(EMPTY, inherited)
        state = 0 if self.invert else inherited
        if self.src_addr and any(item(q) for item in self.src_addr):
            state |= SRC_ADDR
        if self.src_port and any(item(q) for item in self.src_port):
            state |= SRC_PORT
        if self.dst_addr and any(item(q) for item in self.dst_addr):
            state |= DST_ADDR
        if self.dst_port and any(item(q) for item in self.dst_port):
            state |= DST_PORT
        for item in self.items:
            if not item(q):
                return self._fail(inherited)
        if self.rule_sets:
            states = 0
            for ref in self.rule_sets:
                states |= ref.states(q, state)
        else:
            states = 1 << state
        need = (
            (SRC_ADDR if self.src_addr else 0)
            | (SRC_PORT if self.src_port else 0)
            | (DST_ADDR if self.dst_addr else 0)
            | (DST_PORT if self.dst_port else 0)
        )
        if need:
            kept = 0
            for s in range(16):
                if states >> s & 1 and s & need == need:
                    kept |= 1 << s
            states = kept
        if not states:
            return self._fail(inherited)
        return 0 if self.invert else states


class _LogicalRule(_Compiled):
    __slots__ = ("invert", "mode_and", "rules")

    def __init__(self, rules: Sequence[_Compiled], mode_and: bool, invert: bool) -> None:
        self.rules = tuple(rules)
        self.mode_and = mode_and
        self.invert = invert

    def states(self, q: Query, inherited: int) -> int:
        # Nested rules match on their own conditions; the result carries no group of its own
        # (it neither lifts nor satisfies the groups of a rule that refers to a set of it).
        if self.mode_and:
            matched = all(rule.states(q, 0) for rule in self.rules)
        else:
            matched = any(rule.states(q, 0) for rule in self.rules)
        return _with_base(EMPTY, inherited) if matched != self.invert else 0


# --------------------------------------------------------------------------------------------
# compiling


def _is_private(ip: IPAddress) -> bool:
    return not ip.is_global


def _port_items(ports: list[int] | None, ranges: list[str] | None, attr: str) -> list[_Item]:
    items: list[_Item] = []
    if ports:
        wanted = frozenset(ports)
        items.append(lambda q: getattr(q, attr) in wanted)
    if ranges:
        bounds = tuple(parse_port_range(r) for r in ranges)

        def in_range(q: Query) -> bool:
            port = getattr(q, attr)
            return port is not None and any(lo <= port <= hi for lo, hi in bounds)

        items.append(in_range)
    return items


RuleSetTable = dict[str, RuleSetFile[tuple[_Compiled, ...]]]


def _dst_addr_items(rule: HeadlessRule) -> list[_Item]:
    items: list[_Item] = []
    domains = DomainMatcher(
        rule.domain or (),
        rule.domain_suffix or (),
        rule.domain_keyword or (),
        rule.domain_regex or (),
    )
    if domains:
        match_domain = domains.match
        items.append(lambda q: q.domain is not None and match_domain(q.domain))
    if rule.ip_cidr:
        match_ip = IpMatcher(rule.ip_cidr).match
        items.append(lambda q: q.ip is not None and match_ip(q.ip))
    if rule.ip_is_private is not None:
        want = rule.ip_is_private
        items.append(lambda q: q.ip is not None and _is_private(q.ip) == want)
    return items


def _src_addr_items(rule: HeadlessRule) -> list[_Item]:
    items: list[_Item] = []
    if rule.source_ip_cidr:
        match_ip = IpMatcher(rule.source_ip_cidr).match
        items.append(lambda q: q.source_ip is not None and match_ip(q.source_ip))
    if rule.source_ip_is_private is not None:
        want = rule.source_ip_is_private
        items.append(lambda q: q.source_ip is not None and _is_private(q.source_ip) == want)
    return items


def _other_items(rule: HeadlessRule) -> list[_Item]:
    items: list[_Item] = []
    if rule.network:
        networks = frozenset(rule.network)
        items.append(lambda q: q.network in networks)
    if rule.inbound:
        inbounds = frozenset(rule.inbound)
        items.append(lambda q: q.inbound in inbounds)
    if rule.process_name:
        names = frozenset(rule.process_name)

        def by_name(q: Query) -> bool:
            process = q.process
            return process is not None and process.name in names

        items.append(by_name)
    if rule.process_path:
        paths = frozenset(rule.process_path)

        def by_path(q: Query) -> bool:
            process = q.process
            return process is not None and process.path in paths

        items.append(by_path)
    return items


def compile_rule(rule: Any, rule_sets: RuleSetTable | None = None) -> _Compiled:
    """Compile one rule (a `HeadlessRule`, `HeadlessLogicalRule` or their routing forms)."""
    if isinstance(rule, HeadlessLogicalRule):
        return _LogicalRule(
            [compile_rule(r, rule_sets) for r in rule.rules], rule.mode == "and", bool(rule.invert)
        )
    refs = []
    for tag in rule.rule_set or ():
        if rule_sets is None or tag not in rule_sets:
            raise RoutingError(f"no rule set is tagged {tag!r}")
        refs.append(_RuleSetRef(rule_sets[tag]))
    return _DefaultRule(
        _dst_addr_items(rule),
        _port_items(rule.port, rule.port_range, "port"),
        _src_addr_items(rule),
        _port_items(rule.source_port, rule.source_port_range, "source_port"),
        _other_items(rule),
        refs,
        bool(rule.invert),
    )


_DST_ONLY = frozenset(
    {"domain", "domain_suffix", "domain_keyword", "domain_regex", "ip_cidr", "ip_is_private"}
)


def compile_rule_set(rules: Sequence[Any]) -> tuple[_Compiled, ...]:
    """A rule set's rules, each run of plain destination-address rules merged into one.

    Merging keeps the meaning: such a rule yields the destination-address state when it
    matches and nothing else, so a run of them (in place, the order of the set is kept) is the
    one merged rule. It makes a set of 100k one-domain rules one hashed lookup instead of 100k.
    """
    compiled: list[_Compiled] = []
    run: dict[str, list[Any]] = {}
    for rule in rules:
        if isinstance(rule, HeadlessRule) and not rule.invert:
            found = rule.conditions()
            if found and found.keys() <= _DST_ONLY and "ip_is_private" not in found:
                for name, values in found.items():
                    run.setdefault(name, []).extend(values)
                continue
        if run:
            compiled.append(compile_rule(HeadlessRule.model_construct(None, **run)))
            run = {}
        compiled.append(compile_rule(rule))
    if run:
        compiled.append(compile_rule(HeadlessRule.model_construct(None, **run)))
    return tuple(compiled)


def match_rule(rule: Any, query: Query, rule_sets: RuleSetTable | None = None) -> bool:
    """Does `rule` match? (Compiles on every call: for tests and tools, not the data path.)"""
    return compile_rule(rule, rule_sets).states(query, 0) != 0


def load_rule_sets(config: RoutingConfig, base_dir: Path | None = None) -> RuleSetTable:
    """Read and compile every `routing.rule_set` file; RoutingError names the one that failed."""
    table: RuleSetTable = {}
    for entry in config.rule_set:
        file: RuleSetFile[tuple[_Compiled, ...]] = RuleSetFile(
            entry, base_dir or Path.cwd(), compile_rule_set
        )
        try:
            file.load()
        except RuleSetError as exc:
            raise RoutingError(str(exc)) from None
        table[entry.tag] = file
    return table


class Router:
    """Compiled routing rules. `route()` is synchronous and allocation-light."""

    def __init__(
        self,
        config: RoutingConfig,
        outbound_tags: Iterable[str],
        *,
        base_dir: Path | None = None,
        rule_sets: RuleSetTable | None = None,
        process_lookup: ProcessLookup | None = None,
    ) -> None:
        tags = list(outbound_tags)
        if not tags:
            raise RoutingError("no outbounds")
        known = set(tags)
        self.config = config
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
        self.rule_sets = rule_sets if rule_sets is not None else load_rule_sets(config, base_dir)
        compiled = []
        for index, rule in enumerate(config.rules):
            try:
                compiled.append(compile_rule(rule, self.rule_sets))
            except RoutingError as exc:
                raise RoutingError(f"routing.rules[{index}]: {exc}") from None
        self._rules = tuple(zip(compiled, (r.outbound for r in config.rules), strict=True))
        self._rules_use_process = uses_process(config.rules)
        self.process_lookup = process_lookup
        self.rule_hits = [0] * len(self._rules)
        self.default_hits = 0

    @property
    def uses_process(self) -> bool:
        """Some rule (or rule set) has a process condition: connections need their owner."""
        return self._rules_use_process or any(f.uses_process for f in self.rule_sets.values())

    def route(
        self,
        destination: Address,
        network: Network,
        inbound: str,
        source: Address | None = None,
        process_lookup: ProcessLookup | None = None,
    ) -> RouteDecision:
        """The outbound for a connection; `process_lookup` overrides the router's own (e.g. a
        result looked up off the event loop)."""
        lookup = process_lookup or self.process_lookup
        query = Query(destination, network, inbound, source, lookup)
        for index, (rule, outbound) in enumerate(self._rules):
            if rule.states(query, 0):
                self.rule_hits[index] += 1
                return RouteDecision(outbound, index)
        self.default_hits += 1
        return RouteDecision(self.default_outbound, None)

    def refresh_rule_sets(self) -> list[str]:
        """Re-read the rule-set files that changed; one line per set re-read or refused."""
        lines = []
        for file in self.rule_sets.values():
            if not file.changed():
                continue
            try:
                file.load()
            except RuleSetError as exc:
                logger.error("%s; keeping its previous rules", exc)
                lines.append(f"rule set {file.tag}: {exc}")
                continue
            logger.info(
                "rule set %s reloaded (%d rules) from %s", file.tag, file.rule_count, file.path
            )
            lines.append(f"rule set {file.tag} reloaded")
        return lines

    def stats(self) -> dict[str, object]:
        return {
            "rule_hits": list(self.rule_hits),
            "default_hits": self.default_hits,
            "rule_sets": [file.status() for file in self.rule_sets.values()],
        }
