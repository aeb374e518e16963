"""Rules whose meaning changed with sing-box semantics, and how to keep their old meaning.

Before, a rule matched when every condition matched. Now (sing-box semantics, router.py) the
conditions of one group are alternatives: a rule with two or more destination-address
conditions (`domain`, `domain_suffix`, `domain_keyword`, `domain_regex`, `ip_cidr`) or with both
`port` and `port_range` now matches when any of them does. Every other rule means what it
meant. `ostp-client check` and `format` name the rules that changed;
`format --keep-old-rule-meaning` rewrites each into a `logical` `and` rule of one-condition
rules, which matches exactly what the old rule matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ostp_client.config import (
    DESTINATION_PORT_CONDITIONS,
    SOURCE_PORT_CONDITIONS,
    ClientConfig,
    LogicalRoutingRule,
    RoutingRule,
)

__all__ = ["MeaningChange", "keep_old_rule_meaning", "rule_meaning_changes"]

# The groups an old config could have used (source conditions and ip_is_private are new).
_OLD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("domain", "domain_suffix", "domain_keyword", "domain_regex", "ip_cidr"),
    DESTINATION_PORT_CONDITIONS,
    SOURCE_PORT_CONDITIONS,
)


@dataclass(frozen=True, slots=True)
class MeaningChange:
    index: int
    """Position in `routing.rules`."""
    alternatives: tuple[tuple[str, ...], ...]
    """The conditions that became alternatives, per group."""

    @property
    def path(self) -> str:
        return f"routing.rules[{self.index}]"

    def message(self) -> str:
        groups = "; ".join(" or ".join(group) for group in self.alternatives)
        return (
            f"{self.path}: now matches when any of {groups} matches (sing-box semantics);"
            " before, all of them had to match. Keep the old meaning with"
            " `ostp-client format --keep-old-rule-meaning`"
        )


def _changed_groups(rule: RoutingRule) -> tuple[tuple[str, ...], ...]:
    present = rule.conditions()
    found = []
    for group in _OLD_GROUPS:
        used = tuple(name for name in group if name in present)
        if len(used) >= 2:
            found.append(used)
    return tuple(found)


def rule_meaning_changes(config: ClientConfig) -> list[MeaningChange]:
    """The top-level default rules whose match differs between the old AND-of-everything and
    sing-box semantics (logical rules are new, so they have no old meaning)."""
    changes = []
    for index, rule in enumerate(config.routing.rules):
        if isinstance(rule, RoutingRule) and not rule.invert:
            groups = _changed_groups(rule)
            if groups:
                changes.append(MeaningChange(index, groups))
    return changes


def _split(rule: RoutingRule) -> LogicalRoutingRule:
    """One nested rule per condition of a changed group, one for the other conditions."""
    data: dict[str, Any] = rule.model_dump(exclude_none=True, exclude={"outbound", "type"})
    data.pop("invert", None)
    nested: list[dict[str, Any]] = []
    for group in _changed_groups(rule):
        for name in group:
            nested.append({name: data.pop(name)})
    if data:
        nested.append(data)
    return LogicalRoutingRule.model_validate(
        {"type": "logical", "mode": "and", "rules": nested, "outbound": rule.outbound}
    )


def keep_old_rule_meaning(config: ClientConfig) -> tuple[ClientConfig, list[MeaningChange]]:
    """`config` with every changed rule rewritten to its old meaning, and what was rewritten."""
    changes = rule_meaning_changes(config)
    if not changes:
        return config, []
    rules: list[Any] = list(config.routing.rules)
    for change in changes:
        rule = rules[change.index]
        assert isinstance(rule, RoutingRule)
        rules[change.index] = _split(rule)
    routing = config.routing.model_copy(update={"rules": rules})
    return config.model_copy(update={"routing": routing}), changes
