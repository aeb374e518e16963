"""The distributions: metadata of every package, and the built wheels installed into a fresh
virtual environment outside the checkout, used the way a user does (version, check, the demo's
curl, the dashboard's --help, pipx)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest

import ostp_client
import ostp_netstack
import ostp_proto
import ostp_server
import ostp_sockets
import ostp_tui

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["ostp-proto", "ostp-netstack", "ostp-sockets", "ostp-client", "ostp-server", "ostp-tui"]
DISTRIBUTIONS = [*PACKAGES, "ostp-py"]
IN_CI = os.environ.get("CI") == "true"
VERSION = ostp_client.__version__
SERIES = ">=0.2.0.dev0,<0.3"


def _pyproject(name: str) -> dict[str, Any]:
    with (ROOT / "packages" / name / "pyproject.toml").open("rb") as handle:
        data: dict[str, Any] = tomllib.load(handle)["project"]
    return data


# -- metadata --------------------------------------------------------------------------------


def test_one_version_everywhere() -> None:
    versions = {
        m.__name__: m.__version__
        for m in (ostp_proto, ostp_netstack, ostp_sockets, ostp_client, ostp_server, ostp_tui)
    }
    assert set(versions.values()) == {VERSION}, versions
    assert _pyproject("ostp-py")["version"] == VERSION
    for name in PACKAGES:
        assert _pyproject(name)["dynamic"] == ["version"]
    # inter-package requirements name the same minor series
    major_minor = ".".join(VERSION.split(".")[:2])
    assert SERIES.startswith(f">={major_minor}")
    for name in DISTRIBUTIONS:
        for requirement in _pyproject(name).get("dependencies", []):
            match = re.match(r"(ostp-[a-z]+)(\[[a-z,]+\])?(.*)", requirement)
            if match:
                assert match.group(3) == SERIES, (name, requirement)


def test_every_distribution_has_complete_metadata() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "MIT License" in license_text
    for name in DISTRIBUTIONS:
        project = _pyproject(name)
        assert project["requires-python"] == ">=3.11", name
        assert project["license"] == "MIT", name
        assert project["license-files"] == ["LICENSE"], name
        assert (ROOT / "packages" / name / "LICENSE").read_text() == license_text, name
        assert (ROOT / "packages" / name / "README.md").is_file(), name
        assert project["readme"] == "README.md"
        urls = project["urls"]
        assert isinstance(urls, dict) and urls["Protocol (upstream OSTP)"].endswith("ospab/ostp")
        classifiers = project["classifiers"]
        assert isinstance(classifiers, list)
        assert "Programming Language :: Python :: 3.11" in classifiers
        assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression
        for requirement in project.get("dependencies", []):
            if not requirement.startswith("ostp-") and not requirement.startswith("cryptography"):
                assert "<" in requirement, f"{name}: {requirement} has no upper bound"
    client = _pyproject("ostp-client")
    assert client["scripts"] == {"ostp-client": "ostp_client.cli:main"}
    extras = client["optional-dependencies"]
    assert isinstance(extras, dict)
    assert extras["tui"] == [f"ostp-tui{SERIES}"]
    assert extras["fast"][0].startswith("uvloop")
    combined = _pyproject("ostp-py")
    assert combined["dependencies"] == [f"ostp-client[tui]{SERIES}", f"ostp-netstack{SERIES}"]
    assert set(combined["scripts"]) == {"ostp-client", "ostp-tui"}


# -- built and installed ---------------------------------------------------------------------


def _need(tool: str, how: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if IN_CI:
            pytest.fail(f"{tool} is missing ({how})")
        pytest.skip(f"{tool} is not installed ({how})")
    return found


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("hatch", "pip install hatch")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


def _outside_env(bin_dir: Path) -> dict[str, str]:
    """No checkout on the path: PATH starts with the venv, no PYTHONPATH, no hatch env."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "HATCH_ENV_ACTIVE")
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/local/bin", "/usr/bin", "/bin"])
    return env


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (outside the checkout) with every wheel and nothing else of ours."""
    home = tmp_path_factory.mktemp("venv")
    target = home / "venv"
    wheels = sorted(str(p) for p in dist.glob("*.whl"))
    assert len(wheels) == len(DISTRIBUTIONS), wheels
    uv = shutil.which("uv")
    if uv is not None:
        commands = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(target)],
            [uv, "pip", "install", "--quiet", "--python", str(target / "bin/python"), *wheels],
        ]
    else:
        commands = [
            [sys.executable, "-m", "venv", str(target)],
            [str(target / "bin/python"), "-m", "pip", "install", "--quiet", *wheels],
        ]
    for argv in commands:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=home,
            env=_outside_env(target / "bin"),
            check=False,
        )
        assert result.returncode == 0, result.stderr
    return target


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=_outside_env(venv / "bin"),
        check=False,
    )


def test_wheels_carry_license_metadata_and_entry_points(dist: Path) -> None:
    for wheel in dist.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), wheel
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(archive.read(meta_name).decode())
        assert meta["Version"] == VERSION
        assert meta["Requires-Python"] == ">=3.11"
        assert meta["License-Expression"] == "MIT"
        assert any("ospab/ostp" in url for url in meta.get_all("Project-URL") or [])
    assert len(list(dist.glob("*.tar.gz"))) == len(DISTRIBUTIONS)


@pytest.mark.slow
def test_installed_wheels_work_without_the_checkout(venv: Path, tmp_path: Path) -> None:
    code = "import ostp_client, ostp_tui; print(ostp_client.__file__)"
    where = _run(venv, "python", "-c", code, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)
    version = _run(venv, "ostp-client", "version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith(f"ostp-client {VERSION}\n")
    config = tmp_path / "config.json"
    link = "ostp://0123456789abcdef@127.0.0.1:50000"
    assert (
        _run(venv, "ostp-client", "import", link, "-o", str(config), cwd=tmp_path).returncode == 0
    )
    check = _run(venv, "ostp-client", "check", "-c", str(config), cwd=tmp_path)
    assert check.returncode == 0 and ": OK (" in check.stdout, check.stderr
    help_text = _run(venv, "ostp-tui", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "usage: ostp-tui" in help_text.stdout, help_text.stderr
    # the dashboard through the client (pipx users): a bad option reaches ostp-tui's parser
    passed_on = _run(venv, "ostp-client", "tui", "--log-level", "nonsense", cwd=tmp_path)
    assert passed_on.returncode == 2 and "usage: ostp-tui" in passed_on.stderr
    server_help = _run(venv, "ostp-server", "--help", cwd=tmp_path)
    assert server_help.returncode == 0 and "gen-key" in server_help.stdout


@pytest.mark.slow
def test_the_demos_curl_through_the_installed_client_and_server(venv: Path, tmp_path: Path) -> None:
    curl = _need("curl", "apt install curl")
    from tests.client.cli_process import free_tcp_port

    port = free_tcp_port()
    demo = subprocess.Popen(
        [str(venv / "bin/ostp-client"), "demo", "--port", str(port), "--duration", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_outside_env(venv / "bin"),
        start_new_session=True,
    )
    try:
        assert demo.stdout is not None
        command = None
        deadline = time.monotonic() + 60
        for line in demo.stdout:  # the demo prints the curl commands to try once it is up
            if line.strip().startswith(f"curl -x socks5h://127.0.0.1:{port} http://"):
                command = line.split()
                break
            assert time.monotonic() < deadline
        assert command is not None, "the demo printed no curl command"
        fetched = subprocess.run(
            [curl, "-sS", "--fail", *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert "came through the OSTP tunnel" in fetched.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            _, stderr = demo.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate(timeout=10)
            raise
    assert "Traceback" not in stderr, stderr


@pytest.fixture
def pipx_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    pipx = _need("pipx", "apt install pipx")
    env = _outside_env(tmp_path / "bin")
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), str(Path(pipx).parent), env["PATH"]])
    env.update(PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    yield env


@pytest.mark.slow
def test_pipx_install_of_the_client_then_the_combined_distribution(
    dist: Path, tmp_path: Path, pipx_env: dict[str, str]
) -> None:
    """README: `pipx install './packages/ostp-client[tui]'` (its ostp-* dependencies from
    ./dist until they are on PyPI), then `ostp-py`, which also exposes `ostp-tui`."""
    find_links = f"--pip-args=--find-links={dist}"

    def pipx(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["pipx", *args],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env=pipx_env,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    # as the README writes it: the client alone, then again with the dashboard
    pipx("install", find_links, str(ROOT / "packages" / "ostp-client"))
    client = tmp_path / "bin" / "ostp-client"
    version = subprocess.run(
        [str(client), "version"], capture_output=True, text=True, env=pipx_env, check=False
    )
    assert version.stdout.startswith(f"ostp-client {VERSION}")
    no_tui = subprocess.run(
        [str(client), "tui"], capture_output=True, text=True, env=pipx_env, check=False
    )
    assert no_tui.returncode == 1 and "'ostp-client[tui]'" in no_tui.stderr
    pipx("install", "--force", find_links, str(ROOT / "packages" / "ostp-client") + "[tui]")
    assert not (tmp_path / "bin" / "ostp-tui").exists()  # pipx exposes the client's only
    # the extra's dashboard through the client: a bad option reaches ostp-tui's own parser
    dashboard = subprocess.run(
        [str(client), "tui", "--log-level", "nonsense"],
        capture_output=True,
        text=True,
        env=pipx_env,
        check=False,
    )
    assert dashboard.returncode == 2 and "usage: ostp-tui" in dashboard.stderr
    pipx("uninstall", "ostp-client")
    pipx("install", find_links, str(next(dist.glob("ostp_py-*.whl"))))
    for name in ("ostp-client", "ostp-tui"):
        shown = subprocess.run(
            [str(tmp_path / "bin" / name), "--help"],
            capture_output=True,
            text=True,
            env=pipx_env,
            check=False,
        )
        assert shown.returncode == 0 and f"usage: {name}" in shown.stdout, shown.stderr
