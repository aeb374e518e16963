"""Rule sets from local files, and the compiled matchers that make large sets cheap.

A rule set is read from a file in one of two formats:

- ``source``: sing-box's rule-set source format, JSON ``{"version": N, "rules": [...]}`` whose
  rules are headless rules (a default rule's conditions, or ``"type": "logical"``).
- ``text``: one entry a line; ``#`` starts a comment. A line that is an IP address or CIDR is an
  ``ip_cidr`` entry; any other line is a domain that matches itself and its subdomains
  (``domain_suffix``). The prefixes ``full:`` (exact ``domain``), ``domain:`` (suffix),
  ``keyword:`` and ``regexp:`` (as in v2ray's domain lists) and ``+.``/``.`` (suffix, as in
  Clash lists) are understood.

Lookups cost does not grow with the size of the set: exact and suffix domains are one hashed
set each (a suffix lookup probes the set once per label of the name), keywords go through one
Aho-Corasick automaton (cost by the length of the name), CIDRs become merged, sorted integer
ranges searched with `bisect` (IPv4 and IPv6 apart). Regular expressions are joined into one
pattern (their cost does grow with their number; lists of thousands belong in the other kinds).

`RuleSetFile` remembers the file's identity (mtime, size, inode) so that the daemon re-reads it
only when it changed; a file that became unreadable or invalid keeps the last good rules.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from ostp_client.config import HeadlessRule, HeadlessRuleConfig, RuleSetConfig, strip_json_comments
from ostp_client.errors import OstpClientError

__all__ = [
    "DomainMatcher",
    "IpMatcher",
    "RuleSetError",
    "RuleSetFile",
    "normalize_domain",
    "parse_source_rule_set",
    "parse_text_rule_set",
    "uses_process",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

KEYWORD_AUTOMATON_MIN = 8
"""From this many keywords on, one Aho-Corasick pass replaces a substring test per keyword."""


class RuleSetError(OstpClientError, ValueError):
    """A rule-set file that cannot be read or is not valid; the message names the file."""


def normalize_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


# --------------------------------------------------------------------------------------------
# domains


class _KeywordAutomaton:
    """Aho-Corasick over the keywords: `search(text)` is True when any keyword occurs."""

    __slots__ = ("_goto", "_hit")

    def __init__(self, keywords: Iterable[str]) -> None:
        goto: list[dict[str, int]] = [{}]
        hit = [False]
        for word in keywords:
            node = 0
            for ch in word:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    hit.append(False)
                node = nxt
            hit[node] = True
        fail = [0] * len(goto)
        queue = list(goto[0].values())
        for node in queue:  # breadth first: queue grows while iterating
            for ch, child in goto[node].items():
                queue.append(child)
                state = fail[node]
                while state and ch not in goto[state]:
                    state = fail[state]
                target = goto[state].get(ch, 0)
                fail[child] = target if target != child else 0
                hit[child] = hit[child] or hit[fail[child]]
        # Complete the transitions of every node (a DFA), so that a search is one dict probe a
        # character; the tables stay small for realistic keyword lists.
        for node in queue:
            inherited = goto[fail[node]]
            own = goto[node]
            for ch, target in inherited.items():
                own.setdefault(ch, target)
        self._goto = goto
        self._hit = hit

    def search(self, text: str) -> bool:
        goto, hit = self._goto, self._hit
        root = goto[0]
        node = 0
        for ch in text:
            node = goto[node].get(ch) or root.get(ch, 0)
            if hit[node]:
                return True
        return False


class DomainMatcher:
    """Exact names, suffixes, keywords and regular expressions, compiled for lookup."""

    __slots__ = ("_auto", "_exact", "_keywords", "_regex", "_suffix", "size")

    def __init__(
        self,
        exact: Iterable[str] = (),
        suffix: Iterable[str] = (),
        keyword: Iterable[str] = (),
        regex: Iterable[str] = (),
    ) -> None:
        self._exact = frozenset(normalize_domain(d) for d in exact)
        # a leading '.' is ignored (spec §10.8): "example.com" and ".example.com" both match
        # example.com and every name under it
        self._suffix = frozenset(normalize_domain(d).lstrip(".") for d in suffix) - {""}
        keywords = tuple(dict.fromkeys(k.lower() for k in keyword if k))
        self._keywords = keywords if len(keywords) < KEYWORD_AUTOMATON_MIN else ()
        self._auto = _KeywordAutomaton(keywords) if len(keywords) >= KEYWORD_AUTOMATON_MIN else None
        patterns = list(regex)
        self._regex = re.compile("|".join(f"(?:{r})" for r in patterns)) if patterns else None
        self.size = len(self._exact) + len(self._suffix) + len(keywords) + len(patterns)

    def __bool__(self) -> bool:
        return self.size > 0

    def match(self, domain: str) -> bool:
        """`domain` must be normalized (lower case, no trailing dot)."""
        if domain in self._exact:
            return True
        suffix = self._suffix
        if suffix:
            if domain in suffix:
                return True
            start = domain.find(".")
            while start >= 0:
                if domain[start + 1 :] in suffix:
                    return True
                start = domain.find(".", start + 1)
        if self._keywords and any(k in domain for k in self._keywords):
            return True
        if self._auto is not None and self._auto.search(domain):
            return True
        return self._regex is not None and self._regex.search(domain) is not None


# --------------------------------------------------------------------------------------------
# addresses


def _merged(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ranges.sort()
    starts: list[int] = []
    ends: list[int] = []
    for low, high in ranges:
        if ends and low <= ends[-1] + 1:
            ends[-1] = max(ends[-1], high)
        else:
            starts.append(low)
            ends.append(high)
    return starts, ends


class IpMatcher:
    """CIDRs as merged integer ranges per family; `match(ip)` is one bisect."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(
        self, cidrs: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network]
    ) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for item in cidrs:
            net = item if not isinstance(item, str) else ipaddress.ip_network(item, strict=False)
            low = int(net.network_address)
            (v4 if net.version == 4 else v6).append((low, low + net.num_addresses - 1))
        self.size = len(v4) + len(v6)
        self._v4 = _merged(v4)
        self._v6 = _merged(v6)

    def __bool__(self) -> bool:
        return self.size > 0

    def match(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        starts, ends = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        index = bisect.bisect_right(starts, value) - 1
        return index >= 0 and value <= ends[index]


# --------------------------------------------------------------------------------------------
# files

_HEADLESS_RULES: TypeAdapter[list[Any]] = TypeAdapter(list[HeadlessRuleConfig])
_TEXT_PREFIXES = {
    "full:": "domain",
    "domain:": "domain_suffix",
    "keyword:": "domain_keyword",
    "regexp:": "domain_regex",
}


def parse_text_rule_set(text: str, source: str = "") -> list[HeadlessRule]:
    """A plain list (see the module docstring) as one headless rule; RuleSetError on a bad
    line (with its number)."""
    lists: dict[str, list[str]] = {
        "domain": [],
        "domain_suffix": [],
        "domain_keyword": [],
        "domain_regex": [],
        "ip_cidr": [],
    }
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind = None
        for prefix, name in _TEXT_PREFIXES.items():
            if line.startswith(prefix):
                kind, line = name, line[len(prefix) :].strip()
                break
        if kind is None:
            if line.startswith("+."):
                kind, line = "domain_suffix", line[2:]
            elif _is_cidr(line):
                kind = "ip_cidr"
            else:
                kind = "domain_suffix"
        if kind == "domain_regex":
            try:
                re.compile(line)
            except re.error as exc:
                raise RuleSetError(f"{source}:{number}: bad regular expression: {exc}") from None
        elif kind != "ip_cidr" and (not line or any(c.isspace() for c in line)):
            raise RuleSetError(f"{source}:{number}: {raw.strip()!r} is not a domain or CIDR")
        lists[kind].append(line)
    fields = {name: values for name, values in lists.items() if values}
    if not fields:
        return []
    return [HeadlessRule.model_construct(None, **fields)]


def _is_cidr(text: str) -> bool:
    if not (text[0].isdigit() or ":" in text):
        return False
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_source_rule_set(text: str, source: str = "") -> list[Any]:
    """sing-box's source format: the headless rules (validated); RuleSetError otherwise."""
    try:
        data = json.loads(strip_json_comments(text))
    except json.JSONDecodeError as exc:
        raise RuleSetError(
            f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RuleSetError(f'{source}: expected {{"version": N, "rules": [...]}}')
    version = data.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= 3:
        raise RuleSetError(f"{source}: version {version!r} is not 1, 2 or 3")
    try:
        return _HEADLESS_RULES.validate_python(data["rules"])
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}"
                for p in error["loc"]
                if p not in ("default", "logical")
            )
            problems.append(f"rules{where}: {error['msg']}")
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise RuleSetError(f"{source}: {'; '.join(problems)}{more}") from None


def uses_process(rules: Iterable[Any]) -> bool:
    """Some rule (or nested rule) has a process condition."""
    for rule in rules:
        nested = getattr(rule, "rules", None)
        if nested is not None:
            if uses_process(nested):
                return True
        elif getattr(rule, "process_name", None) or getattr(rule, "process_path", None):
            return True
    return False


T = TypeVar("T")


@dataclass(slots=True)
class _Identity:
    mtime_ns: int
    size: int
    inode: int


class RuleSetFile(Generic[T]):
    """One `routing.rule_set` entry: its file, and what `compile` made of its rules.

    `compiled` is replaced (never mutated) by `reload()`, so a lookup always sees a whole set.
    """

    def __init__(
        self,
        config: RuleSetConfig,
        base_dir: Path,
        compile: Callable[[Sequence[Any]], T],
    ) -> None:
        self.config = config
        self.tag = config.tag
        path = Path(os.path.expanduser(config.path))
        self.path = path if path.is_absolute() else base_dir / path
        self._compile = compile
        self._identity: _Identity | None = None
        self.compiled: T = compile([])
        self.rule_count = 0
        self.uses_process = False
        self.loads = 0
        self.last_error: str | None = None

    def _stat(self) -> _Identity:
        info = self.path.stat()
        return _Identity(info.st_mtime_ns, info.st_size, info.st_ino)

    def changed(self) -> bool:
        """The file is not the one last loaded (or it went away)."""
        try:
            return self._stat() != self._identity
        except OSError:
            return self._identity is not None or self.last_error is None

    def load(self) -> None:
        """Read, parse and compile the file; RuleSetError (the old rules stay) on failure."""
        try:
            identity = self._stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.last_error = f"rule set {self.tag!r}: cannot read {self.path}: {exc}"
            raise RuleSetError(self.last_error) from None
        where = f"rule set {self.tag!r} ({self.path})"
        try:
            if self.config.effective_format == "source":
                rules = parse_source_rule_set(text, where)
            else:
                rules = parse_text_rule_set(text, where)
            compiled = self._compile(rules)
        except RuleSetError as exc:
            self.last_error = str(exc)
            raise
        except ValueError as exc:  # a CIDR or port range the compiler refused
            self.last_error = f"{where}: {exc}"
            raise RuleSetError(self.last_error) from None
        self.compiled = compiled
        self.rule_count = len(rules)
        self.uses_process = uses_process(rules)
        self._identity = identity
        self.loads += 1
        self.last_error = None

    def status(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "path": str(self.path),
            "rules": self.rule_count,
            "loads": self.loads,
            "error": self.last_error,
        }
