"""WinINet backend against a fake registry and a fake InternetSetOption (runs on any OS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.sysproxy import SystemProxy, SystemProxyError
from ostp_client.sysproxy.statefile import Owner, SavedState, StateFile
from ostp_client.sysproxy.windows import (
    INTERNET_OPTION_REFRESH,
    INTERNET_OPTION_SETTINGS_CHANGED,
    REG_DWORD,
    REG_SZ,
    WindowsBackend,
    WindowsWinInet,
    decode,
    encode,
    proxy_override,
)

from .sysproxy_fakes import FakeWinInet

REG_EXPAND_SZ = 2
SERVER = "http=127.0.0.1:1088;https=127.0.0.1:1088"
OVERRIDE = (
    "localhost;127.*;[::1];10.*;"
    + ";".join(f"172.{n}.*" for n in range(16, 32))
    + ";192.168.*;<local>"
)
REFRESH = [("option", 39), ("option", 37)]


def make(fake: FakeWinInet, tmp_path: Path) -> SystemProxy:
    return SystemProxy({"windows": WindowsBackend(fake)}, "windows", tmp_path / "sysproxy.json")


def test_refresh_option_numbers_are_wininet_h() -> None:
    assert (INTERNET_OPTION_SETTINGS_CHANGED, INTERNET_OPTION_REFRESH) == (39, 37)


def test_apply_writes_exact_strings_then_refreshes(tmp_path: Path) -> None:
    fake = FakeWinInet({"ProxyEnable": (REG_DWORD, 0)})
    proxy = make(fake, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    assert fake.writes() == [
        ("set", "ProxyServer", REG_SZ, SERVER),
        ("set", "ProxyOverride", REG_SZ, OVERRIDE),
        ("delete", "AutoConfigURL"),
        ("set", "ProxyEnable", REG_DWORD, 1),
        *REFRESH,
    ]
    assert fake.values == {
        "ProxyEnable": (REG_DWORD, 1),
        "ProxyServer": (REG_SZ, SERVER),
        "ProxyOverride": (REG_SZ, OVERRIDE),
    }
    status = proxy.status()
    assert status.backend == "windows" and status.enabled and status.ours
    assert status.pending_restore


def test_state_file_is_written_before_the_first_change(tmp_path: Path) -> None:
    fake = FakeWinInet({"ProxyEnable": (REG_DWORD, 0)})
    state = tmp_path / "sysproxy.json"
    seen: list[bool] = []
    original = fake.set_value

    def spy(name: str, reg_type: int, data: object) -> None:
        seen.append(state.exists())
        original(name, reg_type, data)  # type: ignore[arg-type]

    fake.set_value = spy  # type: ignore[method-assign]
    make(fake, tmp_path).apply("127.0.0.1", 1088)
    assert seen and all(seen)
    saved = json.loads(state.read_text())
    assert saved["previous"] == {
        "ProxyServer": None,
        "ProxyOverride": None,
        "AutoConfigURL": None,
        "ProxyEnable": encode(REG_DWORD, 0),
    }
    if sys.platform != "win32":
        assert state.stat().st_mode & 0o777 == 0o600
        assert state.parent.stat().st_mode & 0o777 == 0o700


def test_restore_deletes_values_that_were_absent(tmp_path: Path) -> None:
    fake = FakeWinInet({"ProxyEnable": (REG_DWORD, 0), "Unrelated": (REG_SZ, "x")})
    before = dict(fake.values)
    proxy = make(fake, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    fake.calls.clear()
    assert proxy.restore() is True
    assert fake.writes() == [
        ("set", "ProxyEnable", REG_DWORD, 0),  # switched off first
        ("delete", "ProxyServer"),
        ("delete", "ProxyOverride"),
        ("delete", "AutoConfigURL"),
        *REFRESH,
    ]
    assert fake.values == before
    assert not proxy.state_path.exists()
    assert proxy.restore() is False


def test_restore_brings_back_custom_values_and_types(tmp_path: Path) -> None:
    before: dict[str, tuple[int, object]] = {
        "ProxyEnable": (REG_DWORD, 1),
        "ProxyServer": (REG_EXPAND_SZ, "corp-proxy.example:8080"),
        "ProxyOverride": (REG_SZ, "*.corp.example;<local>"),
        "AutoConfigURL": (REG_SZ, "http://wpad.corp.example/proxy.pac"),
    }
    fake = FakeWinInet(dict(before))  # type: ignore[arg-type]
    proxy = make(fake, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    assert fake.values["ProxyServer"] == (REG_SZ, SERVER)
    assert "AutoConfigURL" not in fake.values
    fake.calls.clear()
    proxy.restore()
    assert fake.values == before
    assert fake.writes()[-2:] == REFRESH


def test_no_registry_value_with_an_empty_string_after_restore(tmp_path: Path) -> None:
    fake = FakeWinInet()  # nothing existed, not even ProxyEnable
    proxy = make(fake, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    proxy.restore()
    assert fake.values == {}
    assert ("delete", "ProxyEnable") in fake.calls
    assert not [c for c in fake.calls if c[0] == "set" and c[3] in ("", 0)]


def test_failed_apply_rolls_back_and_removes_state(tmp_path: Path) -> None:
    before: dict[str, tuple[int, object]] = {
        "ProxyEnable": (REG_DWORD, 0),
        "ProxyServer": (REG_SZ, "old:1"),
    }
    fake = FakeWinInet(dict(before), fail_on="ProxyOverride")  # type: ignore[arg-type]
    proxy = make(fake, tmp_path)
    with pytest.raises(SystemProxyError, match="Access is denied"):
        proxy.apply("127.0.0.1", 1088)
    fake.fail_on = None
    assert fake.values == before
    assert not proxy.state_path.exists()


def test_next_start_recovers_stale_state(tmp_path: Path) -> None:
    before: dict[str, tuple[int, object]] = {
        "ProxyEnable": (REG_DWORD, 1),
        "ProxyServer": (REG_SZ, "corp:3128"),
    }
    fake = FakeWinInet(dict(before))  # type: ignore[arg-type]
    make(fake, tmp_path).apply("127.0.0.1", 1088)
    # the process "dies" here: a dead pid owns the state file
    state = StateFile(tmp_path / "sysproxy.json")
    saved = state.load()
    assert saved is not None
    state.save(
        SavedState(saved.backend, None, saved.previous, saved.applied, Owner(_dead_pid(), "x", "1"))
    )
    fresh = make(fake, tmp_path)
    assert fresh.status().pending_restore
    assert fresh.recover_stale() is True
    assert fake.values == before
    assert fresh.recover_stale() is False


def test_apply_over_stale_state_keeps_the_original_previous_values(tmp_path: Path) -> None:
    before: dict[str, tuple[int, object]] = {"ProxyEnable": (REG_DWORD, 0)}
    fake = FakeWinInet(dict(before))  # type: ignore[arg-type]
    make(fake, tmp_path).apply("127.0.0.1", 1088)
    proxy = make(fake, tmp_path)
    proxy.apply("127.0.0.1", 2000)  # same process again: old record is recovered first
    assert fake.values["ProxyServer"] == (REG_SZ, "http=127.0.0.1:2000;https=127.0.0.1:2000")
    proxy.restore()
    assert fake.values == before


@pytest.mark.requires(Path("/proc/self/stat").exists(), "needs Linux /proc")
def test_state_owned_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    fake = FakeWinInet({"ProxyEnable": (REG_DWORD, 0)})
    make(fake, tmp_path).apply("127.0.0.1", 1088)
    state = StateFile(tmp_path / "sysproxy.json")
    saved = state.load()
    assert saved is not None
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = Owner.current()
        owner = Owner(other.pid, owner.boot_id, _ticks(other.pid))
        state.save(SavedState(saved.backend, None, saved.previous, saved.applied, owner))
        proxy = make(fake, tmp_path)
        assert proxy.recover_stale() is False
        with pytest.raises(SystemProxyError, match=f"pid {other.pid}"):
            proxy.apply("127.0.0.1", 1088)
        assert proxy.status().owner_pid == other.pid
        assert proxy.restore() is True  # an explicit restore still works
    finally:
        other.kill()
        other.wait()
    assert fake.values == {"ProxyEnable": (REG_DWORD, 0)}


def test_real_wininet_refuses_politely_off_windows() -> None:
    if sys.platform == "win32":
        pytest.skip("Windows has the real API")
    with pytest.raises(SystemProxyError, match="needs Windows"):
        WindowsWinInet().query_value("ProxyEnable")
    with pytest.raises(SystemProxyError, match="needs Windows"):
        WindowsBackend().check()


@pytest.mark.parametrize(
    ("bypass", "expected"),
    [
        (("localhost", "<local>"), "localhost;<local>"),
        (("10.0.0.0/8",), "10.*"),
        (("192.168.0.0/16",), "192.168.*"),
        (("192.168.1.0/24", "192.168.1.7"), "192.168.1.*;192.168.1.7"),
        (("100.64.0.0/10",), ";".join(f"100.{n}.*" for n in range(64, 128))),
        (("::1", "fd00::/8", "*.example"), "[::1];*.example"),
    ],
)
def test_proxy_override_translation(bypass: tuple[str, ...], expected: str) -> None:
    assert proxy_override(bypass) == expected


reg_data = st.one_of(
    st.integers(0, 2**64 - 1),
    st.text(),
    st.lists(st.text()),
    st.binary(),
    st.none(),
)


@given(st.integers(0, 11), reg_data)
def test_saved_registry_values_round_trip(reg_type: int, data: object) -> None:
    assert decode(encode(reg_type, data)) == (reg_type, data)  # type: ignore[arg-type]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _ticks(pid: int) -> str | None:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()[19]
