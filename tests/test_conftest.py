"""tests/conftest.py: the shared "skip here, fail in CI" rule and the Hypothesis profile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.internal.conjecture.data as hypothesis_data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck

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


# -- the Hypothesis profile ----------------------------------------------------------------------


class _BusyClock(types.ModuleType):
    """``time`` as Hypothesis's data module sees it on a loaded machine: every reading of
    ``perf_counter`` comes 500 ms later than the last, as if other jobs held the CPU."""

    def __init__(self) -> None:
        super().__init__("time")
        self.readings = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def perf_counter(self) -> float:
        self.readings += 1
        return time.perf_counter() + 0.5 * self.readings


def _property_test(profile: settings) -> Callable[[], None]:
    nested = st.recursive(
        st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=10,
    )

    @profile
    @given(st.lists(nested, max_size=4))
    def prop(value: list[Any]) -> None:
        assert isinstance(value, list)

    return prop


def test_the_profile_does_not_time_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = settings.default
    assert loaded is not None and loaded.deadline is None
    assert HealthCheck.too_slow in loaded.suppress_health_check
    monkeypatch.setattr(hypothesis_data, "time", _BusyClock())
    # Hypothesis's stock settings fail such a test on a busy machine; the profile does not.
    with pytest.raises(FailedHealthCheck, match="generation is slow"):
        _property_test(settings(settings.get_profile("default"), database=None))()
    _property_test(settings(loaded, database=None, max_examples=30))()
