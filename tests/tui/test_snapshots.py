"""Snapshot tests of the dashboard's main screens, fed by a deterministic fake control link."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from textual.pilot import Pilot

from ostp_tui.app import Dashboard
from tests.tui.fakes import RATES, FakeLink, fake_connector, offline_connector

pytestmark = pytest.mark.timeout(60)

SIZE = (140, 40)
EVENTS = len(RATES) + 3  # status steps, connections, routes, logs


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Log timestamps are local time: pin the zone so the snapshots do not depend on it."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


async def _fed(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, Dashboard)
    for _ in range(200):
        if app.events_applied >= EVENTS:
            break
        await pilot.pause(0.01)
    await pilot.pause()
    app.set_focus(None)
    await pilot.pause()


def _dashboard() -> Dashboard:
    path = "/run/user/1000/ostp-client/control.sock"
    return Dashboard(path, connector=fake_connector(FakeLink()))


SnapCompare = Callable[..., bool]


def test_main_screen(snap_compare: SnapCompare) -> None:
    assert snap_compare(_dashboard(), terminal_size=SIZE, run_before=_fed)


def test_log_level_and_filter(snap_compare: SnapCompare) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await _fed(pilot)
        await pilot.press("l", "l")  # info → warning → error
        await pilot.press("slash", *"git", "enter")

    assert snap_compare(_dashboard(), terminal_size=SIZE, run_before=before)


def test_sorted_by_download(snap_compare: SnapCompare) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await _fed(pilot)
        await pilot.press("s", "s", "s")  # id → destination → outbound → down

    assert snap_compare(_dashboard(), terminal_size=SIZE, run_before=before)


def test_help_screen(snap_compare: SnapCompare) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await _fed(pilot)
        await pilot.press("question_mark")

    assert snap_compare(_dashboard(), terminal_size=SIZE, run_before=before)


def test_daemon_not_running(snap_compare: SnapCompare) -> None:
    path = "/run/user/1000/ostp-client/control.sock"
    app = Dashboard(path, connector=offline_connector(path), retry_interval=60)

    async def before(pilot: Pilot[Any]) -> None:
        for _ in range(200):
            if app.link_state == "offline":
                break
            await pilot.pause(0.01)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
