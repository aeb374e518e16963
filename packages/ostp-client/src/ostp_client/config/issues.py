"""What is wrong with a configuration: `ConfigIssue`/`ConfigError`, readable messages.

Pydantic's errors are turned into one message per problem naming the field by its JSON path
(`outbounds[0].server`); the checks that span the file (unknown or duplicate tags, group
cycles, overlapping listeners, process rules on other platforms) are here too.
"""

from __future__ import annotations

import difflib
import ipaddress
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
)

from ostp_client.config.models import (
    PROCESS_CONDITIONS,
    BlockOutboundConfig,
    ClientConfig,
    ControlConfig,
    DirectOutboundConfig,
    FallbackOutboundConfig,
    GroupOutboundConfig,
    HeadlessLogicalRule,
    HeadlessRule,
    InboundConfig,
    LocalProxyInboundConfig,
    LogConfig,
    LogicalRoutingRule,
    MetricsConfig,
    MuxConfig,
    OstpOutboundConfig,
    OutboundConfig,
    RouteRuleConfig,
    RoutingConfig,
    RoutingRule,
    RuleSetConfig,
    SelectorOutboundConfig,
    TunInboundConfig,
    UrlTestOutboundConfig,
    UserConfig,
    one_or_many,
)
from ostp_client.errors import OstpClientError
from ostp_proto.address import format_host_port

# --------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    """JSON path of the field, e.g. `outbounds[0].server`; empty for the whole document."""
    message: str


@dataclass(eq=False)
class ConfigError(OstpClientError):
    """An invalid configuration; `issues` say where and what."""

    issues: list[ConfigIssue]
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"invalid configuration{where}:"]
        for issue in self.issues:
            lines.append(f"  {issue.path or '(top level)'}: {issue.message}")
        return "\n".join(lines)


_SECRET_FIELDS = frozenset({"access_key", "password"})


def _format_path(loc: Sequence[int | str], data: Any) -> tuple[str, Any, bool]:
    """Render a pydantic `loc` as a JSON path, skipping discriminator-tag segments."""
    parts: list[str] = []
    node: Any = data
    secret = False
    for segment in loc:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
            node = node[segment] if isinstance(node, list) and segment < len(node) else None
            continue
        if isinstance(node, Mapping) and segment not in node and node.get("type") == segment:
            continue  # the union member pydantic tried, not a field
        if isinstance(node, Mapping) and segment not in node and segment in ("default", "logical"):
            continue  # the rule kind (routing rules' discriminator), not a field
        if (
            isinstance(node, Mapping)
            and segment not in node
            and segment.startswith(("function-", "list[", "union[", "tagged-union["))
        ):
            continue
        parts.append(f".{segment}" if parts else segment)
        secret = secret or segment in _SECRET_FIELDS
        node = node.get(segment) if isinstance(node, Mapping) else None
    return "".join(parts), node, secret


def _issue_message(error: Any, model_fields: Iterable[str], secret: bool) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        close = difflib.get_close_matches(name, list(model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field{hint}"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "missing 'type' (which kind of entry this is)"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    value = error.get("input")
    if not secret and isinstance(value, str | int | float | bool) and kind != "value_error":
        text = repr(value)
        message += f" (got {text[:60] + '...' if len(text) > 60 else text})"
    return message


def _all_field_names() -> list[str]:
    """Every field name of the config models (for "did you mean")."""
    names: set[str] = set()
    for model in (
        ClientConfig,
        LogConfig,
        LocalProxyInboundConfig,
        TunInboundConfig,
        UserConfig,
        MuxConfig,
        OstpOutboundConfig,
        DirectOutboundConfig,
        BlockOutboundConfig,
        RoutingConfig,
        RoutingRule,
        LogicalRoutingRule,
        RuleSetConfig,
        SelectorOutboundConfig,
        UrlTestOutboundConfig,
        FallbackOutboundConfig,
        ControlConfig,
        MetricsConfig,
    ):
        names.update(model.model_fields)
    return sorted(names)


def issues_from_validation(exc: ValidationError, data: Any) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        path, _, secret = _format_path(error["loc"], data)
        issues.append(ConfigIssue(path, _issue_message(error, _all_field_names(), secret)))
    return issues


@dataclass(slots=True)
class _RulePart:
    index: int
    outbound: str | None
    inbounds: list[str]
    has_conditions: bool | None
    """None: unknown (the rule did not validate)."""
    rule_sets: list[tuple[str, str]] = field(default_factory=list)
    """(JSON path of the reference, rule-set tag)."""
    process: list[str] = field(default_factory=list)
    """JSON paths of process conditions."""


@dataclass(slots=True)
class _GroupPart:
    index: int
    tag: str
    members: list[str]
    default: str | None = None


@dataclass(slots=True)
class _Parts:
    """What the checks across entries look at: the validated config's entries or, when the
    config did not validate, those that validate on their own (and the tags of the others as
    written), so that these problems are reported together with the field errors."""

    outbound_tags: list[tuple[int, str]] = field(default_factory=list)
    outbounds_known: bool = True
    """Every outbound's tag is known (else references to unknown tags are not judged)."""
    inbounds: list[tuple[int, LocalProxyInboundConfig | TunInboundConfig]] = field(
        default_factory=list
    )
    inbound_tags: list[tuple[int, str]] = field(default_factory=list)
    inbounds_known: bool = True
    rules: list[_RulePart] = field(default_factory=list)
    groups: list[_GroupPart] = field(default_factory=list)
    rule_set_tags: list[tuple[int, str]] = field(default_factory=list)
    rule_sets_known: bool = True
    default_outbound: str | None = None


def _walk_rule(
    rule: RoutingRule | LogicalRoutingRule | HeadlessRule | HeadlessLogicalRule,
    path: str,
    part: _RulePart,
) -> None:
    """Collect the references of a rule and its nested rules (with their JSON paths)."""
    if isinstance(rule, HeadlessLogicalRule):
        for index, nested in enumerate(rule.rules):
            _walk_rule(nested, f"{path}.rules[{index}]", part)
        return
    part.inbounds.extend(rule.inbound or ())
    for index, tag in enumerate(rule.rule_set or ()):
        part.rule_sets.append((f"{path}.rule_set[{index}]", tag))
    part.process.extend(f"{path}.{name}" for name in PROCESS_CONDITIONS if getattr(rule, name))


def _rule_part(index: int, rule: RoutingRule | LogicalRoutingRule) -> _RulePart:
    has = True if isinstance(rule, LogicalRoutingRule) else bool(rule.conditions())
    part = _RulePart(index, rule.outbound, [], has)
    _walk_rule(rule, f"routing.rules[{index}]", part)
    return part


def _group_part(index: int, item: Any) -> _GroupPart | None:
    if isinstance(item, GroupOutboundConfig):
        default = item.default if isinstance(item, SelectorOutboundConfig) else None
        return _GroupPart(index, item.tag, list(item.outbounds), default)
    return None


def parts_of(config: ClientConfig) -> _Parts:
    return _Parts(
        outbound_tags=[(i, o.tag) for i, o in enumerate(config.outbounds)],
        inbounds=list(enumerate(config.inbounds)),
        inbound_tags=[(i, entry.tag) for i, entry in enumerate(config.inbounds)],
        rules=[_rule_part(i, rule) for i, rule in enumerate(config.routing.rules)],
        groups=[g for i, o in enumerate(config.outbounds) if (g := _group_part(i, o)) is not None],
        rule_set_tags=[(i, r.tag) for i, r in enumerate(config.routing.rule_set)],
        default_outbound=config.routing.default_outbound,
    )


_OUTBOUND_ADAPTER: TypeAdapter[Any] = TypeAdapter(OutboundConfig)
_INBOUND_ADAPTER: TypeAdapter[Any] = TypeAdapter(InboundConfig)
_RULE_ADAPTER: TypeAdapter[Any] = TypeAdapter(RouteRuleConfig)
_RULE_SET_ADAPTER: TypeAdapter[Any] = TypeAdapter(RuleSetConfig)


def _default_tags(*models: type[BaseModel]) -> dict[str, str]:
    return {m.model_fields["type"].default: m.model_fields["tag"].default for m in models}


def _entries(
    raw: Any, adapter: TypeAdapter[Any], default_tags: Mapping[str, str]
) -> tuple[list[tuple[int, Any]], list[tuple[int, str]], bool]:
    """(entries that validate, tags by index, whether every tag is known) of a raw list."""
    if not isinstance(raw, list):
        return [], [], False
    valid: list[tuple[int, Any]] = []
    tags: list[tuple[int, str]] = []
    known = True
    for index, item in enumerate(raw):
        try:
            entry = adapter.validate_python(item)
        except ValidationError:
            tag = None
            if isinstance(item, Mapping):
                tag = item.get("tag", default_tags.get(str(item.get("type"))))
            if isinstance(tag, str):
                tags.append((index, tag))
            else:
                known = False
            continue
        valid.append((index, entry))
        tags.append((index, entry.tag))
    return valid, tags, known


_OUTBOUND_MODELS = (
    OstpOutboundConfig,
    DirectOutboundConfig,
    BlockOutboundConfig,
    SelectorOutboundConfig,
    UrlTestOutboundConfig,
    FallbackOutboundConfig,
)


def parts_of_raw(data: Mapping[str, Any]) -> _Parts:
    parts = _Parts()
    outbounds, parts.outbound_tags, parts.outbounds_known = _entries(
        data.get("outbounds"), _OUTBOUND_ADAPTER, _default_tags(*_OUTBOUND_MODELS)
    )
    parts.groups = [g for i, o in outbounds if (g := _group_part(i, o)) is not None]
    inbounds_raw = data.get("inbounds", [{"type": "local_proxy"}])  # the default inbound
    parts.inbounds, parts.inbound_tags, parts.inbounds_known = _entries(
        inbounds_raw, _INBOUND_ADAPTER, _default_tags(LocalProxyInboundConfig, TunInboundConfig)
    )
    routing = data.get("routing")
    if not isinstance(routing, Mapping):
        return parts
    default = routing.get("default_outbound")
    parts.default_outbound = default if isinstance(default, str) else None
    raw_sets = routing.get("rule_set", [])
    _, parts.rule_set_tags, parts.rule_sets_known = _entries(
        raw_sets if isinstance(raw_sets, list) else [], _RULE_SET_ADAPTER, {}
    )
    rules = routing.get("rules")
    for index, item in enumerate(rules if isinstance(rules, list) else ()):
        if not isinstance(item, Mapping):
            continue
        try:
            parts.rules.append(_rule_part(index, _RULE_ADAPTER.validate_python(item)))
            continue
        except ValidationError:
            pass
        outbound = item.get("outbound")
        inbound = one_or_many(item.get("inbound")) or []
        parts.rules.append(
            _RulePart(
                index,
                outbound if isinstance(outbound, str) else None,
                [tag for tag in inbound if isinstance(tag, str)]
                if isinstance(inbound, list)
                else [],
                None,
            )
        )
    return parts


def _duplicate_tags(kind: str, tags: list[tuple[int, str]]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    first: dict[str, int] = {}
    for index, tag in tags:
        seen = first.setdefault(tag, index)
        if seen != index:
            issues.append(
                ConfigIssue(f"{kind}[{index}].tag", f"duplicate tag {tag!r} (also {kind}[{seen}])")
            )
    return issues


def _check_groups(parts: _Parts, outbound_tags: set[str], known: str) -> list[ConfigIssue]:
    """Group members exist, a selector's default is a member, and no group contains itself."""
    issues: list[ConfigIssue] = []
    members_of = {group.tag: group.members for group in parts.groups}
    for group in parts.groups:
        path = f"outbounds[{group.index}]"
        for position, member in enumerate(group.members):
            if parts.outbounds_known and member not in outbound_tags:
                issues.append(
                    ConfigIssue(
                        f"{path}.outbounds[{position}]",
                        f"no outbound is tagged {member!r} (have {known})",
                    )
                )
        if group.default is not None and group.default not in group.members:
            issues.append(
                ConfigIssue(f"{path}.default", f"{group.default!r} is not one of the outbounds")
            )
        for position, member in enumerate(group.members):
            cycle = _cycle_from(group.tag, member, members_of)
            if cycle is not None:
                issues.append(
                    ConfigIssue(
                        f"{path}.outbounds[{position}]",
                        f"groups form a cycle: {' -> '.join(repr(t) for t in cycle)}",
                    )
                )
    return issues


def _cycle_from(start: str, member: str, members_of: Mapping[str, list[str]]) -> list[str] | None:
    """The path `start -> member -> ... -> start`, if the member leads back (depth-first)."""
    stack: list[tuple[str, list[str]]] = [(member, [start, member])]
    seen: set[str] = set()
    while stack:
        tag, path = stack.pop()
        if tag == start:
            return path
        if tag in seen:
            continue
        seen.add(tag)
        for nested in members_of.get(tag, ()):
            stack.append((nested, [*path, nested]))
    return None


PROCESS_RULE_PLATFORMS = ("linux",)


def check_references(parts: _Parts, platform: str | None = None) -> list[ConfigIssue]:
    platform = sys.platform if platform is None else platform
    issues = _duplicate_tags("outbounds", parts.outbound_tags)
    issues += _duplicate_tags("inbounds", parts.inbound_tags)
    issues += _duplicate_tags("routing.rule_set", parts.rule_set_tags)
    outbound_tags = {tag for _, tag in parts.outbound_tags}
    inbound_tags = {tag for _, tag in parts.inbound_tags}
    rule_set_tags = {tag for _, tag in parts.rule_set_tags}
    known = ", ".join(repr(tag) for tag in dict.fromkeys(tag for _, tag in parts.outbound_tags))
    issues += _check_groups(parts, outbound_tags, known)
    for rule in parts.rules:
        path = f"routing.rules[{rule.index}]"
        outbound = rule.outbound
        if parts.outbounds_known and outbound is not None and outbound not in outbound_tags:
            issues.append(
                ConfigIssue(
                    f"{path}.outbound", f"no outbound is tagged {outbound!r} (have {known})"
                )
            )
        if rule.has_conditions is False:
            issues.append(
                ConfigIssue(path, "a rule needs at least one condition (use default_outbound)")
            )
        if parts.inbounds_known:
            for tag in rule.inbounds:
                if tag not in inbound_tags:
                    issues.append(ConfigIssue(f"{path}.inbound", f"no inbound is tagged {tag!r}"))
        if parts.rule_sets_known:
            for where, tag in rule.rule_sets:
                if tag not in rule_set_tags:
                    have = ", ".join(repr(t) for t in sorted(rule_set_tags)) or "none"
                    issues.append(
                        ConfigIssue(where, f"no rule set is tagged {tag!r} (have {have})")
                    )
        if platform not in PROCESS_RULE_PLATFORMS:
            issues.extend(
                ConfigIssue(
                    where,
                    f"process rules are supported on Linux only (this is {platform}): the owner"
                    " of a connection is found through sock_diag and /proc",
                )
                for where in rule.process
            )
    default = parts.default_outbound
    if parts.outbounds_known and default is not None and default not in outbound_tags:
        issues.append(
            ConfigIssue(
                "routing.default_outbound", f"no outbound is tagged {default!r} (have {known})"
            )
        )
    return issues


def _listen_ips(listen: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if listen == "localhost":  # anyio binds every address the name has
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    return [ipaddress.ip_address(listen)]


def _listens_overlap(a: str, b: str) -> bool:
    """Two listeners on one port collide: the same address, or a wildcard of the same family
    (`::` is IPv6 only: the daemon binds it with IPV6_V6ONLY, so it leaves 0.0.0.0 alone)."""
    return any(
        x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)
        for x in _listen_ips(a)
        for y in _listen_ips(b)
    )


def check_listeners(parts: _Parts) -> list[ConfigIssue]:
    """Two inbounds on the same address and port (a fixed port; 0 picks a free one)."""
    issues: list[ConfigIssue] = []
    bound: list[tuple[int, LocalProxyInboundConfig]] = []
    for index, entry in parts.inbounds:
        if not isinstance(entry, LocalProxyInboundConfig) or entry.port == 0:
            continue
        for other_index, other in bound:
            if other.port == entry.port and _listens_overlap(entry.listen, other.listen):
                issues.append(
                    ConfigIssue(
                        f"inbounds[{index}].port",
                        f"{format_host_port(entry.listen, entry.port)} collides with inbounds"
                        f"[{other_index}] on {format_host_port(other.listen, other.port)}"
                        " (one address and port per inbound)",
                    )
                )
                break
        bound.append((index, entry))
    return issues
