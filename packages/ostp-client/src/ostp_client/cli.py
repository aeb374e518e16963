"""`ostp-client` command line.

Subcommands are registered in `COMMANDS` with the `command()` decorator. Modules listed in
`OPTIONAL_COMMAND_MODULES` are imported (when present) before the parser is built, so another
package module adds a subcommand just by defining, at import time:

    from ostp_client.cli import add_config_argument, command

    def _configure(parser: argparse.ArgumentParser) -> None:
        add_config_argument(parser)

    @command("sysproxy", "set or clear the desktop proxy settings", _configure)
    def _sysproxy(args: argparse.Namespace) -> int:
        ...
        return 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import anyio

from ostp_client.config import (
    ClientConfig,
    ConfigError,
    LocalProxyInboundConfig,
    config_from_share_link,
    config_json_schema,
    dump_config,
    load_config,
)
from ostp_proto.address import format_host_port

__all__ = [
    "COMMANDS",
    "Command",
    "add_config_argument",
    "build_parser",
    "command",
    "load_config_or_exit",
    "main",
    "setup_logging",
]

DEFAULT_CONFIG = "config.json"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 128 + 13
"""stdout was closed early (`ctl connections | head -1`): 128 + SIGPIPE, the status a shell
reports for a C program that SIGPIPE ended, quietly."""

CommandRun = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None
    run: CommandRun


COMMANDS: dict[str, Command] = {}
"""Subcommands by name, in registration order."""

OPTIONAL_COMMAND_MODULES = (
    "ostp_client.ctl",
    "ostp_client.demo",
    "ostp_client.service",
    "ostp_client.dashboard",
)
"""Modules that register more subcommands with `command()` (ctl, demo, service, tui) when they
exist."""

OPTIONAL_SUBPARSER_HOOKS = (("ostp_client.sysproxy.commands", "add_sysproxy_commands"),)
"""`(module, function)`: `function(subparsers)` adds its own parser and sets `func=` (the
`run` callable, `(args) -> int`) as a parser default. Skipped when the module is missing."""


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[CommandRun], CommandRun]:
    """Register a subcommand; the decorated function returns the exit status."""

    def register(run: CommandRun) -> CommandRun:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


def add_config_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        required=required,
        help=f"config file (JSON, // comments allowed; default ./{DEFAULT_CONFIG} if present,"
        " else the user config file; see `ostp-client version`)",
    )


def config_path_or_exit(path: str | None) -> str:
    """`path`, or the first config of the search order (`paths`); exit 2 when there is none."""
    from ostp_client.firstrun import no_config_text  # noqa: PLC0415
    from ostp_client.paths import find_config  # noqa: PLC0415

    if path is not None:
        return path
    found = find_config()
    if found is None:
        _err(no_config_text())
        raise SystemExit(EXIT_CONFIG)
    return str(found)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def load_config_or_exit(path: str) -> ClientConfig:
    """Load a config, printing its problems (by JSON path) and exiting with status 2."""
    try:
        config, warnings = load_config(path)
    except ConfigError as exc:
        _err(str(exc))
        raise SystemExit(EXIT_CONFIG) from None
    for warning in warnings:
        _err(f"warning: {warning}")
    return config


def _stdout_gone() -> int:
    """The reader of stdout went away: no traceback, and no second error when Python flushes
    stdout at exit (it now writes to /dev/null)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def _import_optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name is None or not name.startswith(exc.name):
            _err(f"warning: cannot load {name}: {exc}")  # present but broken: say so
    except Exception as exc:  # a broken plug-in must not take the whole CLI down
        _err(f"warning: cannot load {name}: {exc}")
    return None


def version() -> str:
    try:
        return importlib.metadata.version("ostp-client")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    for name in OPTIONAL_COMMAND_MODULES:
        _import_optional(name)
    parser = argparse.ArgumentParser(
        prog="ostp-client",
        description="OSTP client daemon: SOCKS5/HTTP proxy with rule routing",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.configure is not None:
            cmd.configure(sub_parser)
        sub_parser.set_defaults(func=cmd.run)
    for module_name, function_name in OPTIONAL_SUBPARSER_HOOKS:
        module = _import_optional(module_name)
        if module is not None:
            getattr(module, function_name)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ostp-client`."""
    parser = build_parser()
    status: int
    if not (sys.argv[1:] if argv is None else argv):
        status = _no_arguments(parser)
        if argv is None:
            sys.exit(status)
        return status
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = _stdout_gone()
    if argv is None:
        sys.exit(status)
    return status


def _no_arguments(parser: argparse.ArgumentParser) -> int:
    """A person at a terminal gets what to do next; a script gets the usage and status 2."""
    if sys.stdout.isatty() and sys.stdin.isatty():
        from ostp_client.firstrun import print_guide  # noqa: PLC0415

        print_guide()
        return EXIT_OK
    parser.print_usage(sys.stderr)
    _err("ostp-client: error: a command is required (ostp-client --help lists them)")
    return EXIT_CONFIG


# --------------------------------------------------------------------------------------------
# built-in commands


def _configure_run(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--link",
        metavar="URL",
        help="first run: write the config of this ostp:// share link (to -c FILE, default the"
        " user config file) and run it",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --link: replace an existing, different config"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override log.level from the config",
    )


def _run_backend_options() -> dict[str, object]:
    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}


@command("run", "run the daemon (SIGINT/SIGTERM stop it gracefully)", _configure_run)
def _cmd_run(args: argparse.Namespace) -> int:
    from ostp_client.daemon import run_daemon  # noqa: PLC0415 (keeps `schema` etc. light)
    from ostp_client.executor import DaemonThreadPool  # noqa: PLC0415
    from ostp_client.logging_setup import configure_logging  # noqa: PLC0415

    if args.link is not None:
        status = _config_from_link(args)
        if status != EXIT_OK:
            return status
    args.config = config_path_or_exit(args.config)
    config = load_config_or_exit(args.config)
    try:
        configure_logging(config.log, args.log_level)
    except OSError as exc:
        _err(f"cannot open the log file {config.log.output}: {exc.strerror or exc}")
        return EXIT_FAILURE
    _rule_sets_or_exit(config, args.config)

    async def daemon() -> None:
        # a name lookup still running at the stop must not hold the process (executor.py)
        asyncio.get_running_loop().set_default_executor(DaemonThreadPool())
        await run_daemon(config, config_path=args.config)

    try:
        anyio.run(daemon, backend="asyncio", backend_options=_run_backend_options())
    except (OSError, BaseExceptionGroup) as exc:
        error = _os_error_in(exc)
        if error is None:
            raise  # not an OS error: a bug, whose traceback is wanted
        _err(f"ostp-client: {error}")  # e.g. a busy port: one line, no traceback
        return EXIT_FAILURE
    return EXIT_OK


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OS error under anyio's exception groups that ended the daemon (a `StartError`
    first: it names the part), or None when anything else is in there too."""
    from ostp_client.inbounds.base import StartError  # noqa: PLC0415 (keeps the CLI light)

    if isinstance(exc, BaseExceptionGroup):
        found = [_os_error_in(sub) for sub in exc.exceptions]
        if not found or any(error is None for error in found):
            return None
        return next((e for e in found if isinstance(e, StartError)), found[0])
    return exc if isinstance(exc, OSError) else None


def _config_from_link(args: argparse.Namespace) -> int:
    from ostp_client.firstrun import LinkConfigError, write_link_config  # noqa: PLC0415

    try:
        path, warnings, written = write_link_config(args.link, args.config, args.force)
    except LinkConfigError as exc:
        _err(str(exc))
        return exc.status
    for warning in warnings:
        _err(f"warning: {warning}")
    _err(
        f"{'wrote' if written else 'using'} {path}"
        + (" (next time: ostp-client run)" if written else "")
    )
    args.config = str(path)
    return EXIT_OK


def _rule_warnings(config: ClientConfig) -> None:
    """Warn about rules whose meaning changed with sing-box semantics (rule_migration)."""
    from ostp_client.rule_migration import rule_meaning_changes  # noqa: PLC0415

    for change in rule_meaning_changes(config):
        _err(f"warning: {change.message()}")


def _rule_sets_or_exit(config: ClientConfig, path: str) -> None:
    """Read every rule-set file (as the daemon will); print the failure and exit 2."""
    from ostp_client.router import RoutingError, load_rule_sets  # noqa: PLC0415

    try:
        load_rule_sets(config.routing, config.base_dir)
    except RoutingError as exc:
        _err(f"invalid configuration in {path}:\n  routing.rule_set: {exc}")
        raise SystemExit(EXIT_CONFIG) from None


@command("check", "validate a config file (and read its rule-set files)", add_config_argument)
def _cmd_check(args: argparse.Namespace) -> int:
    args.config = config_path_or_exit(args.config)
    config = load_config_or_exit(args.config)
    _rule_sets_or_exit(config, args.config)
    _rule_warnings(config)
    print(
        f"{args.config}: OK ({len(config.inbounds)} inbound(s), {len(config.outbounds)} "
        f"outbound(s), {len(config.routing.rules)} rule(s), default outbound "
        f"{config.default_outbound!r})"
    )
    return EXIT_OK


def _configure_format(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--stdout", action="store_true", help="print the result instead of rewriting the file"
    )
    parser.add_argument(
        "--keep-old-rule-meaning",
        action="store_true",
        help="rewrite rules whose meaning changed with sing-box semantics (two or more domain/"
        "ip_cidr conditions, or port and port_range) into logical AND rules that match as before",
    )


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds secrets: readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


@command("format", "rewrite a config as canonical JSON (converts flat configs)", _configure_format)
def _cmd_format(args: argparse.Namespace) -> int:
    args.config = config_path_or_exit(args.config)
    from ostp_client.rule_migration import keep_old_rule_meaning  # noqa: PLC0415

    config = load_config_or_exit(args.config)
    if args.keep_old_rule_meaning:
        config, changes = keep_old_rule_meaning(config)
        for change in changes:
            _err(f"{change.path}: rewritten as a logical AND rule (the meaning it had before)")
    else:
        _rule_warnings(config)
    text = dump_config(config)
    if args.stdout:
        sys.stdout.write(text)
    else:
        _write_private(Path(args.config), text)
        _err(f"{args.config}: rewritten")
    return EXIT_OK


@command("schema", "print the JSON Schema of the config file")
def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(), indent=2))
    return EXIT_OK


def _configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("link", help="share link ostp://KEY@HOST:PORT[?...]")
    parser.add_argument(
        "-o",
        "--output",
        help="write the config here (default: the user config file, where `run` finds it;"
        " - for stdout)",
    )
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")


@command("import", "write a config from a share link", _configure_import)
def _cmd_import(args: argparse.Namespace) -> int:
    if args.output != "-":
        from ostp_client.firstrun import LinkConfigError, write_link_config  # noqa: PLC0415

        try:
            path, warnings, written = write_link_config(args.link, args.output, args.force)
        except LinkConfigError as exc:
            _err(str(exc))
            return exc.status
        for warning in warnings:
            _err(f"warning: {warning}")
        _err(f"wrote {path}" if written else f"{path} already holds this configuration")
        return EXIT_OK
    try:
        config, warnings = config_from_share_link(args.link)
    except (ValueError, ConfigError) as exc:
        _err(f"invalid share link: {exc}")
        return EXIT_CONFIG
    for warning in warnings:
        _err(f"warning: {warning}")
    sys.stdout.write(dump_config(config))
    return EXIT_OK


def _configure_proxy_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        help=f"config file (default ./{DEFAULT_CONFIG} or the user config file, if present)",
    )


@command("proxy-env", "print `export` lines pointing the shell at the proxy", _configure_proxy_env)
def _cmd_proxy_env(args: argparse.Namespace) -> int:
    from ostp_client.paths import find_config  # noqa: PLC0415

    path = args.config
    if path is None and (found := find_config()) is not None:
        path = str(found)
    inbound = LocalProxyInboundConfig()
    if path is not None:
        config = load_config_or_exit(path)
        proxies = [i for i in config.inbounds if isinstance(i, LocalProxyInboundConfig)]
        if not proxies:
            _err(f"{path}: no local_proxy inbound")
            return EXIT_FAILURE
        inbound = proxies[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(
        inbound.listen, inbound.listen
    )
    where = format_host_port(host, inbound.port)
    if inbound.users:
        print("# this proxy requires a username and password: add user:pass@ to the URLs")
    print(f'export http_proxy="http://{where}"')
    print(f'export https_proxy="http://{where}"')
    print(f'export all_proxy="socks5h://{where}"')
    print('export no_proxy="localhost,127.0.0.1,::1"')
    return EXIT_OK


@command("version", "print the version and where the config is looked for")
def _cmd_version(args: argparse.Namespace) -> int:
    from ostp_client.paths import config_search_path  # noqa: PLC0415

    print(f"ostp-client {version()}")
    print("config search order (without -c): " + ", ".join(str(p) for p in config_search_path()))
    return EXIT_OK
