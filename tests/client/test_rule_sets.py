"""Rule sets from files (source and text formats), reloaded when they change; process rules
with a real curl process through the local proxy."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.config import (
    ClientConfig,
    RoutingConfig,
    RuleSetConfig,
    config_from_data,
    load_config,
)
from ostp_client.flow import Address
from ostp_client.router import Router, RoutingError, compile_rule_set, load_rule_sets
from ostp_client.rule_set import (
    DomainMatcher,
    IpMatcher,
    RuleSetError,
    RuleSetFile,
    parse_source_rule_set,
    parse_text_rule_set,
)
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

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    require_curl()
    with run_origin() as server:
        yield server


def _router(tmp_path: Path, rule_set: list[dict[str, Any]], rules: list[dict[str, Any]]) -> Router:
    config, _ = config_from_data(
        {
            "outbounds": [{"type": "direct", "tag": "d"}, {"type": "block", "tag": "b"}],
            "routing": {"rule_set": rule_set, "rules": rules, "default_outbound": "d"},
        }
    )
    return Router(config.routing, ["d", "b"], base_dir=tmp_path)


def test_text_and_source_rule_sets_route(tmp_path: Path) -> None:
    (tmp_path / "ads.txt").write_text(
        "# a plain list\nads.test\n+.tracker.test\nfull:exact.test\nkeyword:doubleclick\n"
        "regexp:^metrics[0-9]+\\.\n203.0.113.0/24\n2001:db8::/32\n\n"
    )
    (tmp_path / "cn.json").write_text(
        json.dumps(
            {
                "version": 2,
                "rules": [
                    {"domain_suffix": ["cn"]},
                    {"ip_cidr": ["198.51.100.0/24"], "port": 443},
                ],
            }
        )
    )
    router = _router(
        tmp_path,
        [{"tag": "ads", "path": "ads.txt"}, {"tag": "cn", "path": "cn.json"}],
        [{"rule_set": ["ads", "cn"], "outbound": "b"}],
    )
    blocked = [
        "x.ads.test:80",
        "ads.test:80",
        "a.b.tracker.test:80",
        "exact.test:80",
        "ad.doubleclick.net:80",
        "metrics7.example:80",
        "203.0.113.5:80",
        "[2001:db8::5]:80",
        "www.gov.cn:80",
        "198.51.100.1:443",
    ]
    passed = [
        "sub.exact.test:80",
        "notads.test:80",
        "metrics.example:80",
        "198.51.100.1:80",
        "cn.example:80",
    ]
    for text in blocked:
        assert router.route(Address.parse(text), "tcp", "in").outbound_tag == "b", text
    for text in passed:
        assert router.route(Address.parse(text), "tcp", "in").outbound_tag == "d", text


def test_bad_rule_set_files_are_refused_with_their_name(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"version": 1, "rules": [{"domian": ["x"]}]}')
    with pytest.raises(RoutingError, match=r"rule set 'bad'.*rules\[0\]\.domian"):
        _router(tmp_path, [{"tag": "bad", "path": "bad.json"}], [])
    with pytest.raises(RoutingError, match=r"cannot read .*missing.txt"):
        _router(tmp_path, [{"tag": "m", "path": "missing.txt"}], [])
    (tmp_path / "bad.txt").write_text("good.test\nnot a domain\n")
    with pytest.raises(RoutingError, match=r"bad.txt\):2: 'not a domain'"):
        _router(tmp_path, [{"tag": "t", "path": "bad.txt"}], [])
    with pytest.raises(RuleSetError, match="not valid JSON"):
        parse_source_rule_set("{", "x")
    with pytest.raises(RuleSetError, match="version"):
        parse_source_rule_set('{"version": 9, "rules": []}', "x")


def test_rule_set_file_reloads_when_it_changes_and_keeps_the_old_rules_when_broken(
    tmp_path: Path,
) -> None:
    path = tmp_path / "list.txt"
    path.write_text("one.test\n")
    router = _router(
        tmp_path, [{"tag": "l", "path": "list.txt"}], [{"rule_set": "l", "outbound": "b"}]
    )

    def route(host: str) -> str:
        return router.route(Address(host, 80), "tcp", "in").outbound_tag

    assert (route("one.test"), route("two.test")) == ("b", "d")
    assert router.refresh_rule_sets() == []  # unchanged: not re-read
    path.write_text("two.test\n")
    os.utime(path, ns=(1, 10**18))  # a new mtime even on a coarse clock
    assert router.refresh_rule_sets() == ["rule set l reloaded"]
    assert (route("one.test"), route("two.test")) == ("d", "b")
    path.write_text("not valid at all\n")
    os.utime(path, ns=(1, 2 * 10**18))
    lines = router.refresh_rule_sets()
    assert len(lines) == 1 and "not a domain or CIDR" in lines[0]
    assert route("two.test") == "b"  # the last good rules stay
    assert router.stats()["rule_sets"][0]["error"]  # type: ignore[index]


@pytest.mark.anyio
async def test_daemon_rereads_a_changed_rule_set(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's watcher picks up an edited file without a reload."""
    import ostp_client.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "RULE_SET_POLL", 0.05)
    lists = tmp_path / "block.txt"
    lists.write_text("blocked-one.test\n")
    config_path = tmp_path / "cfg.json"
    config_path.write_text(
        json.dumps(
            {
                "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
                "outbounds": [
                    {
                        "type": "direct",
                        "tag": "direct",
                        "override_address": "127.0.0.1",
                        "override_port": origin.port,
                    },
                    {"type": "block", "tag": "block"},
                ],
                "routing": {
                    "rule_set": [{"tag": "blk", "path": "block.txt"}],
                    "rules": [{"rule_set": ["blk"], "outbound": "block"}],
                    "default_outbound": "direct",
                },
            }
        )
    )
    config, _ = load_config(config_path)
    async with running_daemon_config(config) as daemon:
        port = proxy_port(daemon)

        async def status(host: str) -> int:
            done = await curl(
                [
                    *proxy_args("http", port),
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://{host}/whoami",
                ]
            )
            return int(done.stdout or 0)

        assert await status("blocked-one.test") == 403
        assert await status("blocked-two.test") == 200
        lists.write_text("blocked-two.test\n")
        os.utime(lists, ns=(1, 10**18))
        await wait_for(lambda: daemon.router.rule_sets["blk"].loads == 2, 10)
        assert await status("blocked-one.test") == 200
        assert await status("blocked-two.test") == 403


def running_daemon_config(config: Any) -> Any:
    """`running_daemon` for a config loaded from a file (its directory is the base dir)."""
    from contextlib import asynccontextmanager

    import anyio

    from ostp_client.daemon import Daemon

    @asynccontextmanager
    async def run() -> Any:
        daemon = Daemon(config)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                yield daemon
            finally:
                daemon.stop()

    return run()


@given(
    st.lists(st.from_regex(r"[a-z]{1,4}(\.[a-z]{1,3}){0,2}", fullmatch=True), max_size=20),
    st.from_regex(r"([a-z]{1,4}\.){0,3}[a-z]{1,3}", fullmatch=True),
)
def test_suffix_set_equals_the_naive_definition(suffixes: list[str], host: str) -> None:
    matcher = DomainMatcher(suffix=suffixes)
    naive = any(host == s or host.endswith("." + s) for s in suffixes)
    assert matcher.match(host) is naive


@given(
    st.lists(st.from_regex(r"[a-c]{1,3}", fullmatch=True), min_size=0, max_size=30),
    st.from_regex(r"[a-d.]{0,12}", fullmatch=True),
)
def test_keyword_automaton_equals_substring_search(keywords: list[str], host: str) -> None:
    matcher = DomainMatcher(keyword=keywords)
    assert matcher.match(host) is any(k in host for k in keywords)


@given(
    st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), min_size=0, max_size=30),
    st.ip_addresses(v=4),
)
def test_merged_ranges_equal_ipaddress(nets: list[tuple[Any, int]], ip: Any) -> None:
    networks = [ipaddress.ip_network(f"{a}/{p}", strict=False) for a, p in nets]
    assert IpMatcher(networks).match(ip) is any(ip in n for n in networks)


def test_text_format_kinds() -> None:
    (rule,) = parse_text_rule_set("a.test\n.b.test\nfull:c.test\n10.0.0.0/8 # comment\n")
    assert rule.domain_suffix == ["a.test", ".b.test"] and rule.domain == ["c.test"]
    assert rule.ip_cidr == ["10.0.0.0/8"]
    assert parse_text_rule_set("# nothing\n\n") == []


def test_rule_set_file_status_and_relative_path(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x.test\n")
    file: RuleSetFile[Any] = RuleSetFile(
        RuleSetConfig(tag="x", path="x.txt"), tmp_path, compile_rule_set
    )
    assert file.changed()
    file.load()
    assert not file.changed()
    assert file.status()["rules"] == 1
    table = load_rule_sets(
        RoutingConfig(rule_set=[RuleSetConfig(tag="x", path=str(tmp_path / "x.txt"))])
    )
    assert table["x"].path == tmp_path / "x.txt"


# --------------------------------------------------------------------------------------------
# process rules: a real curl through the proxy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process rules need Linux")
@pytest.mark.anyio
async def test_process_name_rule_routes_curl(origin: Origin) -> None:
    config = {
        "inbounds": [{"type": "local_proxy", "tag": "proxy-in", "port": 0}],
        "outbounds": [
            {"type": "direct", "tag": "others", "bind_address": "127.0.0.31"},
            {"type": "direct", "tag": "curl-out", "bind_address": "127.0.0.32"},
        ],
        "routing": {
            "rules": [{"process_name": ["curl"], "outbound": "curl-out"}],
            "default_outbound": "others",
        },
    }
    async with running_daemon(config) as daemon:
        port = proxy_port(daemon)
        done = await curl([*proxy_args("socks5", port), origin.url("/whoami")])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["client"] == "127.0.0.32"
        # the same request from this Python process is not curl's
        import anyio

        def fetch() -> str:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                request = (
                    f"GET {origin.url('/whoami')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                sock.sendall(request.encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return data.decode()

        answer = await anyio.to_thread.run_sync(fetch)
        assert '"client": "127.0.0.31"' in answer
        hits = daemon.router.stats()["rule_hits"]
        assert hits == [1]
        origin_clients = [e["client"] for e in origin.log() if e["path"] == "/whoami"]
        assert "127.0.0.32" in origin_clients and "127.0.0.31" in origin_clients


def test_process_rules_refused_off_linux() -> None:
    from ostp_client.config.issues import check_references, parts_of

    config = ClientConfig.model_validate(
        {
            "outbounds": [{"type": "direct", "tag": "d"}],
            "routing": {"rules": [{"process_path": ["/usr/bin/curl"], "outbound": "d"}]},
        }
    )
    issues = check_references(parts_of(config), platform="darwin")
    assert [i.path for i in issues] == ["routing.rules[0].process_path"]
    assert "Linux only" in issues[0].message
