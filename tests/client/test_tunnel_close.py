"""A tunnelled connection ends when the local client closes first (curl after a keep-alive
response): the stream's reader must wake up, or the connection stays live forever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
    wait_for,
)
from tests.client.tunnel_helpers import ostp_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


async def test_client_closing_first_ends_the_connection(origin: Origin, tmp_path: Path) -> None:
    with ostp_server(tmp_path) as server:
        config = {
            "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
            "outbounds": [server.outbound()],
            "control": {"socket": ""},
        }
        async with running_daemon(config) as daemon:
            port = proxy_port(daemon)
            for _ in range(3):
                # the origin keeps the HTTP/1.1 connection open; curl closes it when done
                result = await curl(
                    ["-x", f"socks5h://127.0.0.1:{port}", origin.url("/bytes/1000")]
                )
                assert result.returncode == 0, result.stderr
            await wait_for(lambda: not daemon.registry.live, 15)
            assert daemon.registry.closed_total == 3
            assert daemon.registry.closed_bytes_down >= 3000
