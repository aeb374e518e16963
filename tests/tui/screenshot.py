"""Regenerate `docs/tui.svg` from the deterministic fake data:
`hatch run python -m tests.tui.screenshot`."""

from __future__ import annotations

import asyncio
import os
import time

from textual.widgets import DataTable

from ostp_tui.app import Dashboard
from tests.tui.fakes import RATES, FakeLink, fake_connector


async def main() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    app = Dashboard("/run/user/1000/ostp-client/control.sock", connector=fake_connector(FakeLink()))
    async with app.run_test(size=(140, 40)) as pilot:
        while app.events_applied < len(RATES) + 3:
            await pilot.pause(0.01)
        app.query_one("#connections", DataTable).focus()
        await pilot.pause(0.2)
        app.save_screenshot("tui.svg", path="docs")


if __name__ == "__main__":
    asyncio.run(main())
