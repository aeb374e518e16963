"""The daemon as a systemd service: the unit `service install` writes (checked by
`systemd-analyze verify`), and sd_notify against a real notify socket stub."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ostp_client.sdnotify import Notifier
from ostp_client.service import UnitOptions, render_unit
from tests.client.cli_process import (
    free_tcp_port,
    isolated_env,
    program,
    stop,
    wait_for_port,
    write_json,
)

pytestmark = pytest.mark.timeout(120)

IN_CI = os.environ.get("CI") == "true"


def _direct_config(path: Path, port: int, **extra: object) -> Path:
    return write_json(
        path,
        {
            "inbounds": [{"type": "local_proxy", "port": port}],
            "outbounds": [{"type": "direct"}],
            **extra,
        },
    )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program(), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (scripts/test installs the systemd package)")
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    return found


def _verify(unit: Path, *, user: bool = False) -> str:
    """`systemd-analyze verify`: its complaints (it exits 0 for many of them, so read them)."""
    argv = [_systemd_analyze(), *(["--user"] if user else []), "verify", str(unit)]
    env = dict(os.environ)
    if user:  # a user manager needs a runtime directory, also when it only verifies
        runtime = unit.parent / "verify-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # the verifier also checks the units ours pulls in, which do not exist in a container
        if unit.name in line or "ostp" in line
    ]
    assert result.returncode == 0 or complaints, result.stderr
    return "\n".join(complaints)


# -- the unit --------------------------------------------------------------------------------


def test_install_writes_a_system_unit_that_systemd_accepts(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    config = _direct_config(tmp_path / "client.json", free_tcp_port())
    root = tmp_path / "root"
    result = _cli("service", "install", "-c", str(config), "--root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system/ostp-client.service"
    assert f"wrote {unit}" in result.stdout
    assert "systemctl enable --now ostp-client" in result.stdout
    text = unit.read_text()
    lines = set(text.splitlines())
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    words = exec_start.removeprefix("ExecStart=").split()
    assert Path(words[0]).is_absolute() and Path(words[0]).exists()
    assert words[-3:] == ["run", "-c", str(config)]
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5",
        "WatchdogSec=30",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "DeviceAllow=/dev/net/tun rw",
        "WantedBy=multi-user.target",
    ):
        assert expected in lines, expected
    assert _verify(unit) == ""
    status = _cli("service", "status", "--root", str(root), env=env)
    assert status.returncode == 0 and str(unit) in status.stdout
    assert "systemd is not running here" in status.stdout
    again = _cli("service", "install", "-c", str(config), "--root", str(root), env=env)
    assert again.returncode == 0  # the same unit again is fine
    removed = _cli("service", "uninstall", "--root", str(root), env=env)
    assert removed.returncode == 0 and not unit.exists()
    assert _cli("service", "status", "--root", str(root), env=env).returncode == 2


def test_user_unit_has_no_capabilities_and_logs_dir_is_writable(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    config = _direct_config(
        tmp_path / "client.json", free_tcp_port(), log={"output": str(log_dir / "client.log")}
    )
    text = render_unit(UnitOptions(("/usr/bin/ostp-client",), config, user=True))
    assert "Capabilit" not in text and "ProtectSystem" not in text
    assert "WantedBy=default.target" in text
    env = isolated_env(tmp_path)
    root = tmp_path / "root"
    result = _cli("service", "install", "--user", "-c", str(config), "--root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    unit = root / str(tmp_path / ".config").lstrip("/") / "systemd/user/ostp-client.service"
    assert unit.exists(), result.stdout
    assert "loginctl enable-linger" in result.stdout
    assert _verify(unit, user=True) == ""
    system = _cli("service", "install", "-c", str(config), "--root", str(root), env=env)
    unit_text = (root / "etc/systemd/system/ostp-client.service").read_text()
    assert system.returncode == 0
    assert f"ReadWritePaths={log_dir}" in unit_text.splitlines()


def test_install_refuses_a_config_that_cannot_start(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    bad = write_json(tmp_path / "bad.json", {"outbounds": [{"type": "direct", "bogus": 1}]})
    root = tmp_path / "root"
    result = _cli("service", "install", "-c", str(bad), "--root", str(root), env=env)
    assert result.returncode == 2
    assert "outbounds[0].bogus" in result.stderr
    assert not (root / "etc").exists()
    # no -c and no config anywhere: says where it looked
    none = _cli("service", "install", "--root", str(root), env=env)
    assert none.returncode == 2
    assert "ostp-client run --link" in none.stderr


def test_unit_quotes_paths_with_spaces_and_specifiers(tmp_path: Path) -> None:
    config = tmp_path / "my dir" / "100%$x.json"
    config.parent.mkdir()
    _direct_config(config, free_tcp_port())
    unit = tmp_path / "ostp-client.service"
    exe = program()[0]
    unit.write_text(render_unit(UnitOptions((exe,), config, user=False)))
    assert f'"{tmp_path}/my dir/100%%$$x.json"' in unit.read_text()
    assert _verify(unit) == ""


# -- sd_notify -------------------------------------------------------------------------------


@dataclass
class NotifyStub:
    """A service manager's notify socket: records every datagram with its arrival time."""

    address: str
    sock: socket.socket
    events: list[tuple[float, str]] = field(default_factory=list)
    on_message: list[object] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def reader(self, on_ready: object = None) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            text = data.decode()
            with self.cond:
                self.events.append((time.monotonic(), text))
                if on_ready is not None and "READY=1" in text.splitlines():
                    on_ready()  # type: ignore[operator]
                self.cond.notify_all()

    def wait_for(self, word: str, count: int = 1, limit: float = 30) -> list[str]:
        deadline = time.monotonic() + limit
        with self.cond:
            while True:
                hits = [m for _, m in self.events if word in m.splitlines()]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {word} in {self.messages()}")
                self.cond.wait(left)

    def messages(self) -> list[str]:
        return [m for _, m in self.events]


@pytest.fixture
def notify_stub() -> Iterator[NotifyStub]:
    name = f"ostp-test-notify-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # abstract: systemd hands it over as "@name"
    stub = NotifyStub("@" + name, sock)
    try:
        yield stub
    finally:
        sock.close()


def test_notifier_speaks_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(10)
    try:
        notifier = Notifier(str(path), watchdog_usec=2_000_000)
        assert notifier.watchdog_interval == 1.0
        notifier.ready("up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
        notifier.status("up")  # unchanged: nothing sent
        notifier.stopping()
        notifier.stopping()  # once only
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)
    finally:
        receiver.close()
    assert not Notifier(None).notify("READY=1")  # not under systemd: nothing, no error
    gone = Notifier(str(tmp_path / "missing.sock"))
    assert not gone.notify("READY=1")  # a vanished socket is logged, never raised
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environment(env).watchdog_interval is None  # another process's
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environment(env).watchdog_interval == 0.25


def test_ready_comes_after_the_port_listens_then_watchdog_reload_stopping(
    tmp_path: Path, notify_stub: NotifyStub
) -> None:
    port = free_tcp_port()
    config = _direct_config(tmp_path / "client.json", port)
    ready_connect: list[bool] = []

    def on_ready() -> None:
        # the instant READY=1 arrives, the proxy port must accept
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            ready_connect.append(True)
        except OSError:
            ready_connect.append(False)

    reader = threading.Thread(target=notify_stub.reader, args=(on_ready,), daemon=True)
    reader.start()
    env = isolated_env(
        tmp_path, NOTIFY_SOCKET=notify_stub.address, WATCHDOG_USEC="300000", INVOCATION_ID="x"
    )
    process = subprocess.Popen(
        [*program(), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        notify_stub.wait_for("READY=1")
        assert ready_connect == [True]
        first = notify_stub.messages()[0]
        assert first.startswith("READY=1"), notify_stub.messages()
        assert "STATUS=" in first and "connection(s)" in first
        notify_stub.wait_for("WATCHDOG=1", count=3)
        process.send_signal(signal.SIGHUP)  # systemctl reload
        notify_stub.wait_for("RELOADING=1")
        notify_stub.wait_for("READY=1", count=2)
        reloading = next(m for m in notify_stub.messages() if "RELOADING=1" in m)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.splitlines())
        process.send_signal(signal.SIGTERM)
        notify_stub.wait_for("STOPPING=1")
        _, stderr = process.communicate(timeout=30)
    finally:
        stop(process)
    assert process.returncode == 0, stderr
    assert len(notify_stub.wait_for("STOPPING=1")) == 1
    order = [m.splitlines()[0] for m in notify_stub.messages()]
    assert "READY=1" in order[order.index("RELOADING=1") :]
    assert "READY=1" not in order[order.index("STOPPING=1") :]


def test_no_notify_socket_no_messages_and_no_errors(tmp_path: Path) -> None:
    port = free_tcp_port()
    config = _direct_config(tmp_path / "client.json", port)
    env = isolated_env(tmp_path)
    process = subprocess.Popen(
        [*program(), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_port(port, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        stop(process)
    assert process.returncode == 0
    assert "service manager" not in stderr and "Traceback" not in stderr


def test_system_install_warns_about_a_program_others_can_change(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    config = _direct_config(tmp_path / "client.json", free_tcp_port())
    shared = tmp_path / "shared-bin"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may replace what is in here
    (shared / "ostp-client").symlink_to(program()[0])
    root = tmp_path / "root"
    argv = [str(shared / "ostp-client"), "service", "install", "-c", str(config)]
    result = subprocess.run(
        [*argv, "--root", str(root)], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: {shared} can be changed by a user other than root" in result.stderr
    unit = (root / "etc/systemd/system/ostp-client.service").read_text()
    assert f"ExecStart={shared}/ostp-client run -c {config}" in unit  # the link, kept
    user = subprocess.run(
        [*argv, "--user", "--root", str(root)], capture_output=True, text=True, env=env, check=False
    )
    assert user.returncode == 0 and "warning" not in user.stderr  # runs as the user anyway
