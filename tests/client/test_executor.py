"""`DaemonThreadPool`: asyncio's default executor for `ostp-client run` (see executor.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from concurrent.futures import CancelledError

import pytest

from ostp_client.executor import DaemonThreadPool

pytestmark = pytest.mark.timeout(60)


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ostp-client worker")]


def test_results_errors_and_a_bounded_number_of_daemon_threads() -> None:
    pool = DaemonThreadPool(max_workers=3)
    assert pool.submit(pow, 2, 10).result(timeout=10) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(divmod, 1, 0).result(timeout=10)
    release = threading.Event()
    futures = [pool.submit(release.wait, 30) for _ in range(10)]
    assert len(_workers()) <= 3
    assert all(t.daemon for t in _workers())  # the exit never waits for them
    release.set()
    assert all(f.result(timeout=10) for f in futures)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)


def test_shutdown_does_not_wait_for_a_stuck_call() -> None:
    pool = DaemonThreadPool()
    stuck = threading.Event()
    running = pool.submit(stuck.wait, 30)
    queued = [pool.submit(stuck.wait, 30) for _ in range(40)]  # beyond max_workers: waiting
    pool.shutdown(wait=True, cancel_futures=True)  # returns at once
    assert not running.done()
    assert any(f.cancelled() for f in queued)
    stuck.set()
    assert running.result(timeout=10) is True
    for future in queued:
        with contextlib.suppress(CancelledError):
            assert future.result(timeout=10) is True


def test_as_asyncio_default_executor() -> None:
    async def main() -> tuple[int, list[tuple[object, ...]]]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(DaemonThreadPool())
        value = await loop.run_in_executor(None, sum, [1, 2, 3])
        infos = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        return value, [info[4] for info in infos]

    value, addresses = asyncio.run(main())
    assert value == 6
    assert ("127.0.0.1", 80) in addresses
