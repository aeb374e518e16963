"""Outbound groups with real ostp-server processes, real curl and a local origin.

Failover (urltest, the active server SIGKILLed), the choice of a urltest group when one member
is impaired, a selector's choice across a daemon restart, and `ctl select` / `ctl delay`.
Every check URL is the local origin's `/generate_204`: nothing leaves the machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ostp_client.daemon import Daemon
from ostp_client.outbounds.group import GroupOutbound, SelectorOutbound, UrlTestOutbound
from tests.client.group_helpers import DelayRelay
from tests.client.proxy_helpers import (
    Origin,
    curl,
    proxy_args,
    proxy_port,
    require_curl,
    run_origin,
    running_daemon,
    wait_for,
)
from tests.client.tunnel_helpers import ServerProcess
from tests.tui.live import program, short_socket_dir

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    pair = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        server = ServerProcess(workdir)
        server.start()
        pair.append(server)
    try:
        yield pair[0], pair[1]
    finally:
        for server in pair:
            server.stop()


def _group_config(
    origin: Origin, members: list[dict[str, Any]], group: dict[str, Any]
) -> dict[str, Any]:
    return {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            *members,
            group if group["type"] == "selector" else {"url": origin.url("/generate_204"), **group},
            {"type": "direct", "tag": "direct"},
        ],
        "routing": {"default_outbound": group["tag"]},
    }


def _group(daemon: Daemon, tag: str = "auto") -> GroupOutbound:
    group = daemon.outbounds[tag]
    assert isinstance(group, GroupOutbound)
    return group


async def _fetch(port: int, origin: Origin, time_limit: float = 30) -> str:
    done = await curl([*proxy_args("socks5", port), "-m", "20", origin.url("/whoami")], time_limit)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["client"])


async def test_urltest_fails_over_when_the_active_server_is_killed(
    origin: Origin,
    servers: tuple[ServerProcess, ServerProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    a, b = servers
    config = _group_config(
        origin,
        [{**a.outbound(), "tag": "a"}, {**b.outbound(), "tag": "b"}],
        {"type": "urltest", "tag": "auto", "outbounds": ["a", "b"], "interval": 600},
    )
    async with running_daemon(config) as daemon:
        group = _group(daemon)
        await wait_for(lambda: all(daemon.health.get(t).alive for t in ("a", "b")), 30)
        port = proxy_port(daemon)
        await _fetch(port, origin)
        active = group.selected
        killed, survivor = (a, "b") if active == "a" else (b, "a")
        assert killed.process is not None
        before = len(caplog.records)
        killed.process.kill()  # SIGKILL: the server says nothing
        killed.process.wait(10)
        killed.process = None
        started = time.monotonic()
        await _fetch(port, origin)  # a new connection gets through the other server
        took = time.monotonic() - started
        assert group.selected == survivor
        await _fetch(port, origin)
        switches = [r for r in caplog.records[before:] if "switched" in r.getMessage()]
        assert len(switches) == 1, [r.getMessage() for r in switches]
        assert f"{active} -> {survivor}" in switches[0].getMessage()
        status = group.status()
        assert status.selected == survivor
        down = next(m for m in status.members if m.tag == active)
        assert down.usable is False and down.error
        print(f"failover: first new connection after SIGKILL took {took:.2f} s")


async def test_urltest_prefers_the_faster_member(
    origin: Origin, servers: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = servers
    with DelayRelay(a.port, delay=0.15) as relay:  # ~300 ms more per round trip through a
        config = _group_config(
            origin,
            [{**a.outbound(relay.port), "tag": "a"}, {**b.outbound(), "tag": "b"}],
            {
                "type": "urltest",
                "tag": "auto",
                "outbounds": ["a", "b"],
                "interval": 600,
                "tolerance": 50,
            },
        )
        async with running_daemon(config) as daemon:
            group = _group(daemon)
            assert isinstance(group, UrlTestOutbound)
            await wait_for(lambda: all(daemon.health.get(t).alive for t in ("a", "b")), 60)
            delay_a = daemon.health.get("a").delay_ms
            delay_b = daemon.health.get("b").delay_ms
            assert delay_a is not None and delay_b is not None
            assert delay_a > delay_b + 50, (delay_a, delay_b)
            assert group.selected == "b"
            await _fetch(proxy_port(daemon), origin)
            status = group.status()
            assert status.chain == ("b",)


async def test_fallback_uses_the_first_healthy_member(
    origin: Origin, servers: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = servers
    config = _group_config(
        origin,
        [{**a.outbound(), "tag": "a"}, {**b.outbound(), "tag": "b"}],
        {"type": "fallback", "tag": "fb", "outbounds": ["a", "b"], "interval": 600},
    )
    async with running_daemon(config) as daemon:
        group = _group(daemon, "fb")
        await wait_for(lambda: all(daemon.health.get(t).alive for t in ("a", "b")), 30)
        assert group.selected == "a"
        port = proxy_port(daemon)
        await _fetch(port, origin)
        a.stop()  # SIGTERM: the server goes away
        await _fetch(port, origin)
        assert group.selected == "b"


async def test_connections_record_the_group_and_the_member(
    origin: Origin, servers: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = servers
    config = _group_config(
        origin,
        [{**a.outbound(), "tag": "a"}, {**b.outbound(), "tag": "b"}],
        {"type": "selector", "tag": "sel", "outbounds": ["a", "b"], "default": "b"},
    )
    async with running_daemon(config) as daemon:
        port = proxy_port(daemon)
        seen: list[tuple[str | None, tuple[str, ...]]] = []
        dispatcher = daemon.dispatcher
        original = dispatcher.connect_tcp

        async def record(ctx: Any, target: Any) -> Any:
            stream = await original(ctx, target)
            seen.append((ctx.outbound_tag, ctx.via))
            return stream

        dispatcher.connect_tcp = record  # type: ignore[method-assign]
        await _fetch(port, origin)
        assert ("sel", ("sel", "b")) in seen


# --------------------------------------------------------------------------------------------
# a real daemon process: ctl select survives a restart, ctl delay checks now


def _ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program(), "ctl", "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _start(config: Path, state: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(state)}
    return subprocess.Popen(
        [*program(), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


def _status(socket: Path, process: subprocess.Popen[str]) -> dict[str, Any]:
    for _ in range(300):
        if process.poll() is not None:
            raise AssertionError(
                f"daemon exited: {process.stderr.read() if process.stderr else ''}"
            )
        if socket.exists():
            done = _ctl(socket, "--json", "status")
            if done.returncode == 0:
                result: dict[str, Any] = json.loads(done.stdout)
                return result
        time.sleep(0.05)  # polling a process we do not own (no event to wait on)
    raise AssertionError("control socket never answered")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_socket_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_selector_choice_survives_a_restart_and_delay_checks_now(
    origin: Origin, sock_dir: Path
) -> None:
    socket = sock_dir / "control.sock"
    state = sock_dir / "state"
    config = {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            {"type": "direct", "tag": "one", "bind_address": "127.0.0.21"},
            {"type": "direct", "tag": "two", "bind_address": "127.0.0.22"},
            {"type": "selector", "tag": "sel", "outbounds": ["one", "two"]},
        ],
        "routing": {"default_outbound": "sel"},
        "control": {"socket": str(socket)},
    }
    path = sock_dir / "cfg.json"
    path.write_text(json.dumps(config))

    def selected(status: dict[str, Any]) -> str:
        sel = next(o for o in status["outbounds"] if o["id"] == "sel")
        return str(sel["selected"])

    def whoami(status: dict[str, Any]) -> str:
        listen = status["inbounds"][0]["listen"][0]
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--noproxy",
                "",
                "-x",
                f"socks5://{listen}",
                "-m",
                "20",
                origin.url("/whoami"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["client"])

    process = _start(path, state)
    try:
        status = _status(socket, process)
        assert selected(status) == "one"
        assert whoami(status) == "127.0.0.21"
        done = _ctl(socket, "select", "sel", "two")
        assert done.returncode == 0, done.stderr
        assert whoami(_status(socket, process)) == "127.0.0.22"
        refused = _ctl(socket, "select", "sel", "three")
        assert refused.returncode == 1 and "not a member" in refused.stderr
        delay = _ctl(socket, "--json", "delay", "sel", "--url", origin.url("/generate_204"))
        assert delay.returncode == 0, delay.stderr
        results = {r["tag"]: r for r in json.loads(delay.stdout)["results"]}
        assert results["one"]["alive"] is True and results["one"]["delay_ms"] is not None
        assert results["two"]["alive"] is True
        text = _ctl(socket, "status").stdout
        assert "GROUP" in text and "* two" in text
    finally:
        _stop(process)
    assert json.loads((state / "ostp-client" / "selections.json").read_text()) == {
        str(path.resolve()): {"sel": "two"}
    }
    process = _start(path, state)
    try:
        status = _status(socket, process)
        assert selected(status) == "two"  # restored from the state file
        assert whoami(status) == "127.0.0.22"
    finally:
        _stop(process)


async def test_member_state_change_moves_the_group_at_once(
    origin: Origin, servers: tuple[ServerProcess, ServerProcess]
) -> None:
    """When the active member's sessions drop, the group leaves it without a check."""
    a, b = servers
    config = _group_config(
        origin,
        [{**a.outbound(), "tag": "a"}, {**b.outbound(), "tag": "b"}],
        {"type": "urltest", "tag": "auto", "outbounds": ["a", "b"], "interval": 600},
    )
    async with running_daemon(config) as daemon:
        group = _group(daemon)
        await wait_for(lambda: all(daemon.health.get(t).alive for t in ("a", "b")), 30)
        active = group.selected
        member = daemon.outbounds[active]
        reconnect = getattr(member, "reconnect", None)
        assert reconnect is not None
        other = "b" if active == "a" else "a"
        (a if active == "a" else b).stop()
        await reconnect()  # the session drops: state leaves "connected"
        with anyio.fail_after(30):
            while group.selected != other:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.01)


async def test_reload_adds_a_group_and_keeps_an_unchanged_one(origin: Origin) -> None:
    from ostp_client.config import config_from_data

    members = [
        {"type": "direct", "tag": "one", "bind_address": "127.0.0.41"},
        {"type": "direct", "tag": "two", "bind_address": "127.0.0.42"},
    ]
    selector = {"type": "selector", "tag": "sel", "outbounds": ["one", "two"]}
    config = {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [*members, selector],
        "routing": {"default_outbound": "sel"},
    }
    async with running_daemon(config) as daemon:
        port = proxy_port(daemon)
        sel = _group(daemon, "sel")
        assert isinstance(sel, SelectorOutbound)
        sel.select("two")
        assert await _fetch(port, origin) == "127.0.0.42"
        auto = {
            "type": "urltest",
            "tag": "auto",
            "outbounds": ["one", "sel"],
            "url": origin.url("/generate_204"),
            "interval": 600,
        }
        new = {
            **config,
            "outbounds": [*members, selector, auto],
            "routing": {"default_outbound": "auto"},
        }
        parsed, _ = config_from_data(new)
        outcome = await daemon.reload(parsed)
        assert "outbound auto added" in outcome.changes
        assert daemon.outbounds["sel"] is sel and sel.selected == "two"  # kept, with its choice
        group = _group(daemon, "auto")
        await wait_for(lambda: all(daemon.health.get(t).alive for t in ("one", "sel")), 20)
        assert await _fetch(port, origin) in ("127.0.0.41", "127.0.0.42")
        assert group.status().chain in (("one",), ("sel", "two"))
