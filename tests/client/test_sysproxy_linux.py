"""GNOME and KDE backends with the real tools, isolated in temporary config directories."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ostp_client.sysproxy import SystemProxy, SystemProxyError

from .sysproxy_fakes import (
    GSETTINGS_KEYFILE,
    KIOSLAVERC,
    customise_gnome,
    customise_kde,
    gsettings,
    isolated_env,
    kwrite,
    read_ini,
    require_tools,
)


def gnome_snapshot(env: dict[str, str], tmp: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """Effective values of the whole schema plus exactly which keys are user-set."""
    return (
        gsettings(env, "list-recursively", "org.gnome.system.proxy"),
        read_ini(tmp.joinpath(*GSETTINGS_KEYFILE)),
    )


@pytest.fixture
def gnome_env(tmp_path: Path) -> dict[str, str]:
    require_tools("gsettings")
    env = isolated_env(tmp_path)
    try:
        gsettings(env, "get", "org.gnome.system.proxy", "mode")
    except subprocess.CalledProcessError as exc:
        require_tools("gsettings-desktop-schemas:" + exc.stderr.strip())
    return env


@pytest.fixture
def kde_env(tmp_path: Path) -> dict[str, str]:
    require_tools("kwriteconfig5", "kreadconfig5")
    return isolated_env(tmp_path)


def proxy_for(backend: str, env: dict[str, str], tmp: Path) -> SystemProxy:
    return SystemProxy.for_this_system(backend, environ=env, state_path=tmp / "state" / "sp.json")


def test_gnome_apply_sets_manual_proxy(gnome_env: dict[str, str], tmp_path: Path) -> None:
    proxy_for("gnome", gnome_env, tmp_path).apply("127.0.0.1", 1088)

    def get(schema: str, key: str) -> str:
        return gsettings(gnome_env, "get", schema, key).strip()

    assert get("org.gnome.system.proxy", "mode") == "'manual'"
    for child in ("http", "https", "socks"):
        assert get(f"org.gnome.system.proxy.{child}", "host") == "'127.0.0.1'"
        assert get(f"org.gnome.system.proxy.{child}", "port") == "1088"
    assert get("org.gnome.system.proxy", "ignore-hosts") == (
        "['localhost', '127.0.0.0/8', '::1', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16']"
    )


@pytest.mark.parametrize("customised", [False, True], ids=["defaults", "custom"])
def test_gnome_restore_is_exact(
    gnome_env: dict[str, str], tmp_path: Path, customised: bool
) -> None:
    if customised:
        customise_gnome(gnome_env)
    before = gnome_snapshot(gnome_env, tmp_path)
    proxy = proxy_for("gnome", gnome_env, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    assert gnome_snapshot(gnome_env, tmp_path) != before
    assert proxy.status().enabled
    assert proxy.restore() is True
    assert gnome_snapshot(gnome_env, tmp_path) == before
    assert not proxy.state_path.exists()


def test_kde_apply_sets_manual_proxy(kde_env: dict[str, str], tmp_path: Path) -> None:
    proxy_for("kde", kde_env, tmp_path).apply("127.0.0.1", 1088)
    assert read_ini(tmp_path.joinpath(*KIOSLAVERC))["Proxy Settings"] == {
        "ProxyType": "1",
        "httpProxy": "http://127.0.0.1 1088",
        "httpsProxy": "http://127.0.0.1 1088",
        "socksProxy": "socks://127.0.0.1 1088",
        "NoProxyFor": "localhost,127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16",
        "ReversedException": "false",
    }


@pytest.mark.parametrize("customised", [False, True], ids=["absent", "custom"])
def test_kde_restore_is_exact(kde_env: dict[str, str], tmp_path: Path, customised: bool) -> None:
    rc = tmp_path.joinpath(*KIOSLAVERC)
    kwrite(kde_env, "Other", "kept")  # an unrelated key in the group
    if customised:
        customise_kde(kde_env)
    before = read_ini(rc)
    proxy = proxy_for("kde", kde_env, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    assert read_ini(rc) != before
    status = proxy.status()
    assert status.enabled and status.ours
    assert proxy.restore() is True
    # keys that did not exist are gone again, not present with an empty value
    assert read_ini(rc) == before


def test_state_file_mirrors_absence(kde_env: dict[str, str], tmp_path: Path) -> None:
    kwrite(kde_env, "httpProxy", "")  # present but empty is not the same as absent
    proxy = proxy_for("kde", kde_env, tmp_path)
    proxy.apply("127.0.0.1", 1088)
    text = proxy.state_path.read_text()
    assert '"httpProxy": ""' in text
    assert '"socksProxy": null' in text
    assert proxy.state_path.stat().st_mode & 0o777 == 0o600
    proxy.restore()
    assert read_ini(tmp_path.joinpath(*KIOSLAVERC))["Proxy Settings"] == {"httpProxy": ""}


def test_detection_without_a_desktop_is_a_clear_error(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    env.pop("GSETTINGS_BACKEND")
    proxy = SystemProxy.for_this_system(environ=env, state_path=tmp_path / "s.json")
    status = proxy.status()
    assert status.backend is None and status.unavailable_reason
    with pytest.raises(SystemProxyError, match="no supported desktop"):
        proxy.apply("127.0.0.1", 1088)


@pytest.mark.parametrize(
    ("desktop", "backend"),
    [("ubuntu:GNOME", "gnome"), ("KDE", "kde"), ("X-Cinnamon", "gnome")],
)
def test_detection_from_desktop(
    desktop: str, backend: str, gnome_env: dict[str, str], tmp_path: Path
) -> None:
    require_tools("kwriteconfig5", "kreadconfig5")
    env = {**gnome_env, "XDG_CURRENT_DESKTOP": desktop}
    proxy = SystemProxy.for_this_system(environ=env, state_path=tmp_path / "s.json")
    assert proxy.status().backend == backend


@pytest.mark.parametrize("break_it", ["gnome", "kde"])
def test_unchanged_readback_is_an_error_and_rolls_back(
    break_it: str, gnome_env: dict[str, str], tmp_path: Path
) -> None:
    """gsettings exits 0 even when dconf cannot commit: the read-back must catch that."""
    if break_it == "kde":
        require_tools("kwriteconfig5", "kreadconfig5")
    proxy = proxy_for(break_it, gnome_env, tmp_path)
    backend = proxy._backend()
    writes: list[object] = []
    real_write: Callable[..., None] = backend.write
    backend.write = writes.append  # type: ignore[method-assign,assignment]
    with pytest.raises(SystemProxyError, match="did not take effect"):
        proxy.apply("127.0.0.1", 1088)
    backend.write = real_write  # type: ignore[method-assign]
    assert len(writes) == 2  # the apply, then the rollback
    assert not proxy.state_path.exists()
