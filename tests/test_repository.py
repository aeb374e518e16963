"""Checks on the repository itself: it imports, and it needs nothing that lies outside it."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "docs" / "protocol.md"

# Paths that lie outside a clone. The patterns are written so that this file's own text does not
# match them (``[/]`` instead of ``/``), so the file is scanned like any other.
OUTSIDE = {
    "the steering folder beside the checkout": re.compile(r"\.\.[/\\]shared\b|\bshared[/]spec\b"),
    "the workplace's root": re.compile(r"(?<![\w.])/work[/]"),
    "a developer's home directory": re.compile(r"(?<![\w.])/(?:home|Users)[/][\w.-]+[/]"),
    "the outside spec document": re.compile(r"\bwire-protocol[.]md\b"),
    "the old vector-folder variable": re.compile(r"\bOSTP_SPEC_DI[R]\b"),
}
SKIPPED_DIRS = {
    ".git",
    ".hatch",
    ".venv",
    "venv",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "node_modules",
    "build",
    "dist",
}


def repository_files(root: Path = REPO) -> list[Path]:
    """The files that make up the repository: git's list in a checkout, else a walk of the tree.

    In a checkout this is every tracked file plus new files git does not ignore, so a file that
    is about to be committed is checked too.
    """
    git = shutil.which("git")
    if git is not None and (root / ".git").exists():
        listed = subprocess.run(
            [git, "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=False,
        )
        if listed.returncode == 0:
            names = sorted({n for n in listed.stdout.decode().split("\0") if n})
            return [root / n for n in names if (root / n).is_file()]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        found += [Path(directory) / f for f in files]
    return sorted(found)


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary (images, snapshots of binary data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(root: Path = REPO) -> list[str]:
    """``path:line: what`` for every reference to a path outside the repository."""
    found = []
    for path in repository_files(root):
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for what, pattern in OUTSIDE.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {what}: {line.strip()}")
    return found


def test_every_package_imports() -> None:
    for name in (
        "ostp_proto",
        "ostp_netstack",
        "ostp_sockets",
        "ostp_client",
        "ostp_server",
        "ostp_tui",
    ):
        assert importlib.import_module(name).__name__ == name


def test_repository_files_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in repository_files()}
    assert {"pyproject.toml", "tests/test_repository.py", "docs/protocol.md"} <= names
    assert "tests/proto/vectors/upstream-vectors.json" in names
    assert not any("/__pycache__/" in f"/{n}" for n in names)


def test_nothing_refers_to_a_path_outside_the_repository() -> None:
    """A clone with nothing beside it must run every test: no path may lead out of it."""
    assert outside_references() == []


def test_the_outside_path_check_catches_each_kind(tmp_path: Path) -> None:
    # the walk (no git checkout here) and each pattern, so the check above can fail; the bad
    # texts are glued together at run time so that this file itself stays clean
    spec = "shared" + "/spec"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f'SPEC = REPO.parent / "shared"  # ../{spec}\n')
    (tmp_path / "b.md").write_text("see /" + "work/" + spec + "/wire-protocol" + ".md\n")
    (tmp_path / "c.py").write_text('os.environ.get("OSTP_SPEC_' + 'DIR")\n')
    (tmp_path / "d.toml").write_text('path = "/' + 'home/someone/src/ostp/x"\n')
    (tmp_path / "e.txt").write_text("a fake user's home: /home/alice, ~/.venvs/ostp\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "f.py").write_text(f"../{spec}\n")
    found = outside_references(tmp_path)
    kinds = {line.split(": ", 2)[1] for line in found}
    assert kinds == set(OUTSIDE)
    assert {line.split(":", 1)[0] for line in found} == {"pkg/a.py", "b.md", "c.py", "d.toml"}


# -- links and citations ------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)
_SECTION = re.compile(r"(?<!RFC )(?<!Noise )§(\d+(?:\.\d+)?)")
_CITING = re.compile(r"\bspec\b[^§\n]{0,3}§", re.IGNORECASE)


def test_markdown_links_stay_inside_the_repository() -> None:
    broken = []
    for path in repository_files():
        if path.suffix != ".md":
            continue
        for target in _LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert broken == []


def protocol_sections() -> set[str]:
    return set(_HEADING.findall(PROTOCOL.read_text(encoding="utf-8")))


def test_protocol_document_keeps_its_section_numbers() -> None:
    """Code cites ``spec §N``; the numbering of docs/protocol.md must not move under it."""
    expected = {str(n) for n in range(1, 17)} | {
        "6.1",
        *(f"7.{n}" for n in range(1, 5)),
        *(f"9.{n}" for n in range(1, 7)),
        *(f"10.{n}" for n in range(1, 11)),
    }
    assert protocol_sections() >= expected


def test_every_spec_citation_resolves() -> None:
    """Each ``spec §N`` in code and docs names a section that exists in docs/protocol.md."""
    sections = protocol_sections()
    cited = 0
    dangling = []
    for path in repository_files():
        if path.suffix not in (".py", ".md", ".toml") or path == PROTOCOL:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not _CITING.search(line):
                continue
            for section in _SECTION.findall(line):
                cited += 1
                if section not in sections:
                    dangling.append(f"{path.relative_to(REPO)}:{number}: §{section}")
    assert dangling == []
    assert cited > 100  # the scan really saw the code's citations
