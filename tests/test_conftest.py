"""The shared "skip here, fail in CI" rule of tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ci, require, skip_or_fail

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE"])
def test_under_ci_a_missing_requirement_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="needs unicorns"):
        skip_or_fail("needs unicorns")
    with pytest.raises(pytest.fail.Exception, match="needs unicorns"):
        require(False, "needs unicorns")
    require(True, "needs unicorns")  # met: nothing happens


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_outside_ci_a_missing_requirement_skips(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="needs unicorns"):
        skip_or_fail("needs unicorns")
    with pytest.raises(pytest.skip.Exception, match="needs unicorns"):
        require(False, "needs unicorns")
    require(True, "needs unicorns")


SAMPLE = """
import pytest
from tests.conftest import require

@pytest.mark.requires(False, "needs unicorns")
def test_marked():
    pass

@pytest.mark.requires(True, "needs air")
def test_met():
    pass

def test_called():
    require(1 + 1 == 3, "needs new arithmetic")
"""


def _run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    plugins = ["-p", "tests.conftest", "-p", "no:cacheprovider"]
    ini = ["-c", str(tmp_path / "pytest.ini")]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *plugins,
            "-q",
            "-rsf",
            *ini,
            str(tmp_path / "test_sample.py"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_marks_and_calls_in_a_real_run(tmp_path: Path) -> None:
    outside = _run_sample(tmp_path, None)
    assert outside.returncode == 0, outside.stdout + outside.stderr
    assert "1 passed, 2 skipped" in outside.stdout
    assert "needs unicorns" in outside.stdout and "needs new arithmetic" in outside.stdout
    under_ci = _run_sample(tmp_path, "true")
    assert under_ci.returncode == 1, under_ci.stdout + under_ci.stderr
    # the mark acts in setup (an error), the call in the test (a failure): both end the run red
    assert "1 failed, 1 passed, 1 error" in under_ci.stdout
    assert "needs unicorns" in under_ci.stdout and "needs new arithmetic" in under_ci.stdout
