"""``ostp-server run`` as a child process, its log lines collected as they come."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

RUN_SERVER = "import sys; from ostp_server.cli import main; sys.exit(main(sys.argv[1:]))"
LISTENING = re.compile(r"listening on udp (\d+\.\d+\.\d+\.\d+):(\d+)")


class ServerProcess:
    def __init__(self, process: anyio.abc.Process, config: Path) -> None:
        self.process = process
        self.config = config
        self.lines: list[str] = []
        self._changed = anyio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._changed.set()
            self._changed = anyio.Event()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self._changed.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, pattern: str, limit: float = 30.0) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting for it if need be."""
        regex = re.compile(pattern)
        with anyio.fail_after(limit):
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                if self.process.returncode is not None:
                    raise AssertionError(f"server exited ({self.process.returncode}):\n{self.log}")
                await self._changed.wait()

    async def address(self) -> tuple[str, int]:
        m = await self.wait_for(LISTENING.pattern)
        return m.group(1), int(m.group(2))

    async def stop(self, sig: signal.Signals = signal.SIGTERM, limit: float = 15.0) -> int:
        """Send ``sig``; the exit status (fails if the process outlives ``limit``)."""
        self.process.send_signal(sig)
        with anyio.fail_after(limit):
            return await self.process.wait()


def write_config(path: Path, key: str, **extra: Any) -> Path:
    raw: dict[str, Any] = {"mode": "server", "listen": "127.0.0.1:0", "access_keys": [key]}
    raw.update(extra)
    path.write_text(json.dumps(raw))
    return path


@asynccontextmanager
async def server_process(config: Path, *, script: str = RUN_SERVER) -> AsyncIterator[ServerProcess]:
    """Run ``ostp-server run -c config``; killed on the way out if still running."""
    process = await anyio.open_process(
        [sys.executable, "-c", script, "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = ServerProcess(process, config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.collect)
            try:
                yield running
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await process.wait()
                tg.cancel_scope.cancel()
    finally:
        await process.aclose()
