"""The README's "Install with pipx", "Run as a service" and "Scrape metrics" sections say only
what works: every `ostp-client` command in them parses with the real CLI, every config snippet
passes `check`, every file they name exists. (Running them is tests/test_packaging.py's pipx
test, tests/client/test_service.py and tests/client/test_metrics.py.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import ostp_client
from ostp_client.cli import build_parser
from ostp_client.config import config_from_data
from ostp_server.config import ServerConfig
from tests.client.cli_process import program

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Install with pipx", "Run as a service", "Scrape metrics")
SYSTEM_TOOLS = {"systemctl", "journalctl", "loginctl", "curl", "sudo", "python3", "pip"}


def _sections() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    found: dict[str, str] = {}
    for match in re.finditer(r"^## (.+)$", text, re.M):
        title = match.group(1).strip()
        rest = text[match.end() :]
        end = re.search(r"^## ", rest, re.M)
        found[title] = rest[: end.start()] if end else rest
    return found


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.M | re.S)


def test_the_three_sections_come_in_order() -> None:
    titles = list(_sections())
    positions = [titles.index(title) for title in SECTIONS]
    assert positions == sorted(positions)


def _commands(section: str) -> list[tuple[list[str], bool]]:
    """Shell commands of the section's sh blocks (complete: True) and of its inline `...`
    spans (which may be fragments such as `ostp-client run --link`)."""
    lines = [(line, True) for block in _blocks(section, "sh") for line in block.splitlines()]
    inline = re.findall(r"`((?:sudo )?ostp-(?:client|server)[^`]*)`", section)
    lines += [(" ".join(span.split()), span.startswith("sudo ")) for span in inline]
    commands = []
    for line, complete in lines:
        inner = re.search(r"\$\(([^)]*)\)", line)  # eval "$(ostp-client proxy-env)"
        words = shlex.split(inner.group(1) if inner else line, comments=True)
        if words:
            commands.append((words, complete))
    return commands


def _subcommands() -> set[str]:
    parser = build_parser()
    names: set[str] = set()
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        names.update(getattr(action, "choices", {}) or {})
    return names


@pytest.mark.parametrize("title", SECTIONS)
def test_every_command_exists_as_written(title: str) -> None:
    section = _sections()[title]
    commands = _commands(section)
    assert commands
    for written, complete in commands:
        words = written[1:] if written[0] == "sudo" else written
        if words[0] in ("apt", "apt-get"):
            continue
        tool = words[0]
        if tool == "ostp-client" and not complete:
            assert len(words) == 1 or words[1] in _subcommands(), shlex.join(words)
        elif tool == "ostp-client":
            parser = build_parser()
            try:
                parser.parse_args(words[1:])
            except SystemExit as exc:
                pytest.fail(f"{shlex.join(words)}: argparse exit {exc.code}")
        elif tool == "ostp-server":
            result = subprocess.run(
                [*program("ostp-server"), words[1], "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, shlex.join(words)
        elif tool == "scripts/build":
            assert (ROOT / tool).stat().st_mode & 0o111
        elif tool == "pipx":
            assert words[1] == "install"
            target = words[-1]
            if target.startswith("./dist/"):  # the wheel scripts/build writes, this version
                assert f"-{ostp_client.__version__}-py3-none-any.whl" in target
            else:
                path = target.split("[", 1)[0]  # './packages/ostp-client[tui]'
                assert (ROOT / path / "pyproject.toml").is_file(), target
        else:
            assert tool in SYSTEM_TOOLS, f"unknown command in README {title!r}: {words}"


def test_config_snippets_pass_check() -> None:
    sections = _sections()
    for title in SECTIONS:
        for block in _blocks(sections[title], "json"):
            data = json.loads(block)
            config, _ = config_from_data(data)
            assert config.metrics is not None
            assert config.metrics.address == ("127.0.0.1", 9099)
    # the server's metrics block as the section writes it
    server = re.search(r'`("metrics": \{"listen": "[^"]+"\})`', sections["Scrape metrics"])
    assert server is not None
    parsed = ServerConfig.model_validate(
        {"access_keys": ["k"], **json.loads("{" + server.group(1) + "}")}
    )
    assert parsed.metrics is not None and parsed.metrics.address == ("127.0.0.1", 9100)


def test_metric_names_in_the_table_exist() -> None:
    """Every full metric name the section lists is one the collector produces."""
    source = (ROOT / "packages/ostp-client/src/ostp_client/metrics.py").read_text()
    section = _sections()["Scrape metrics"]
    names = set(re.findall(r"`(ostp_client_[a-z_]+?)(?:_total)?`", section))
    assert len(names) > 10
    for name in names:
        if name.endswith("_") or name in ("ostp_client_process",):
            continue
        assert f'"{name}"' in source or name == "ostp_client_build_info", name
