"""What every test shares: the "skip here, fail in CI" rule and the Hypothesis profile.

**Skips.** A test that needs something this machine may lack (root, a tool such as curl or
coturn, IPv6 on loopback) calls :func:`require` or :func:`skip_or_fail`, or carries
``@pytest.mark.requires(condition, reason)`` / ``@pytest.mark.root``. Outside CI it is skipped
with the reason; under ``CI=true`` it fails, because CI installs everything (``scripts/test``)
and a skip there would hide a test that never ran.

**Hypothesis.** Property tests run on a loaded machine (CI shares two cores with other jobs), so
wall-clock limits say nothing about the code: the ``ostp`` profile has no per-example deadline
and does not fail on the ``too_slow`` health check (slow *generation*). ``ostp-ci``, used under
CI as Hypothesis itself does there, also fixes the examples (derandomize) so that a CI run can be
repeated. The health checks about the data itself (filtering too much, data too large) stay on.
``HYPOTHESIS_PROFILE`` picks another profile.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings

CI_FALSE = ("", "0", "false", "no", "off")


def in_ci() -> bool:
    """True when ``CI`` is set to anything but an explicit no (``CI=true`` in CI runs)."""
    return os.environ.get("CI", "").strip().lower() not in CI_FALSE


settings.register_profile("ostp", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CI: the same, plus fixed examples and no example database, so a CI run can be repeated.
settings.register_profile(
    "ostp-ci", settings.get_profile("ostp"), derandomize=True, database=None, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ostp-ci" if in_ci() else "ostp"))


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test with ``reason``; under CI, fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI must run this test, so a missing requirement fails it)")
    pytest.skip(reason)


def require(condition: bool, reason: str) -> None:
    """Continue when ``condition`` holds; else :func:`skip_or_fail` with ``reason``."""
    if not condition:
        skip_or_fail(reason)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(condition, reason): without the condition, skipped with the reason outside CI,"
        " an error under CI=true",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        condition, reason = mark.args
        require(bool(condition), str(reason))
    if item.get_closest_marker("root") is not None:
        require(is_root(), "needs root")
