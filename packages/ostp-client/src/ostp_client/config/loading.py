"""Reading a configuration: JSON with comments, native or upstream's flat format, into a
validated `ClientConfig` (or a `ConfigError` listing every problem); writing one back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from ostp_client.config.flat import convert_flat, flat_path, is_flat_config
from ostp_client.config.issues import (
    ConfigError,
    ConfigIssue,
    check_listeners,
    check_references,
    issues_from_validation,
    parts_of,
    parts_of_raw,
)
from ostp_client.config.models import ClientConfig

# --------------------------------------------------------------------------------------------
# loading


def strip_json_comments(text: str) -> str:
    """Remove `//` line comments and `/* */` block comments outside JSON strings.

    Comment characters are replaced by spaces (newlines kept) so that error positions still
    point at the right line and column.
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_config_text(text: str, source: str = "") -> tuple[ClientConfig, list[str]]:
    """Parse and validate config text; return the config and conversion warnings."""
    try:
        data = json.loads(strip_json_comments(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")],
            source,
        ) from None
    return config_from_data(data, source)


def config_from_data(data: Any, source: str = "") -> tuple[ClientConfig, list[str]]:
    """Validate config data (native or flat); `ConfigError` lists every problem found."""
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the configuration must be a JSON object")], source)
    flat = is_flat_config(data)
    issues: list[ConfigIssue] = []
    lists: dict[str, tuple[str, list[int]]] = {}
    if flat:
        conversion = convert_flat(data)
        data, warnings, issues, lists = (
            conversion.data,
            conversion.warnings,
            conversion.issues,
            conversion.lists,
        )
    config: ClientConfig | None = None
    try:
        config = ClientConfig.model_validate(data)
    except ValidationError as exc:
        found = issues_from_validation(exc, data)
        if flat:
            found = [ConfigIssue(flat_path(i.path, lists), i.message) for i in found]
        issues += found
    parts = parts_of(config) if config is not None else parts_of_raw(data)
    issues += check_references(parts) + check_listeners(parts)
    if issues or config is None:
        raise ConfigError(issues, source, warnings)
    return config, warnings


def load_config(path: str | Path) -> tuple[ClientConfig, list[str]]:
    """Read and validate a config file; raise ConfigError (also for a missing file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    "file not found (write one with `ostp-client import 'ostp://KEY@HOST:PORT'"
                    f" -o {path}`)",
                )
            ],
            str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc}")], str(path)) from None
    config, warnings = parse_config_text(text, str(path))
    return config.with_base_dir(path.resolve().parent), warnings


def dump_config(config: ClientConfig, *, reveal_secrets: bool = True) -> str:
    """Canonical JSON text of a config (secrets written out only with `reveal_secrets`)."""
    data = config.model_dump(
        mode="json", exclude_none=True, context={"reveal_secrets": reveal_secrets}
    )
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def config_json_schema() -> dict[str, Any]:
    schema = ClientConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ostp-client configuration"
    return schema
