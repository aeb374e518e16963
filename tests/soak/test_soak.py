"""The soak test in its CI form: a minute of the browser-like mix, then nothing left behind.

See tests/soak/soak.py for what runs and what is checked; ``scripts/soak --seconds N`` runs the
same for longer and prints the same figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client.proxy_helpers import require_curl
from tests.soak.soak import Settings, run_soak

pytestmark = [pytest.mark.anyio, pytest.mark.soak, pytest.mark.timeout(290)]


async def test_browser_like_mix_with_restarts_leaves_nothing_behind(tmp_path: Path) -> None:
    require_curl()
    report = await run_soak(Settings(seconds=60, warmup=20, seed=1), tmp_path)
    print(report.text())
    assert not report.failures, report.text()
