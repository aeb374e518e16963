"""``ostp-client sysproxy status | set | restore``: argparse glue for the main CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from .backend import DEFAULT_BYPASS, SystemProxyError
from .detect import BACKEND_NAMES
from .manager import SystemProxy

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1088  # spec §10.10 socks5_bind default

ProxyFactory = Callable[[str | None], SystemProxy]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def add_sysproxy_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    default_host: str = DEFAULT_HOST,
    default_port: int = DEFAULT_PORT,
) -> argparse.ArgumentParser:
    """Add the ``sysproxy`` command to a CLI; returns its parser.

    The parser sets ``func=run_sysproxy_command`` as default; the main CLI calls
    ``args.func(args)`` and exits with the ``int`` it returns.
    """
    parser = subparsers.add_parser(
        "sysproxy",
        help="show, set or restore the desktop's system proxy settings",
        description=(
            "Manage the system proxy (GNOME gsettings, KDE kioslaverc, Windows WinINet). "
            "'set' saves the current settings first; 'restore' puts them back exactly. "
            "Settings left behind by a crashed client are restored by 'restore' or by the "
            "next client start."
        ),
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        help="override desktop detection (also $OSTP_SYSPROXY_BACKEND)",
    )
    actions = parser.add_subparsers(dest="sysproxy_action", required=True, metavar="ACTION")
    actions.add_parser("status", help="show the current settings and any saved previous ones")
    set_parser = actions.add_parser("set", help="point the system proxy at the local proxy")
    set_parser.add_argument("--host", default=default_host, help=f"default {default_host}")
    set_parser.add_argument(
        "--port", type=_port, default=default_port, help=f"default {default_port}"
    )
    set_parser.add_argument(
        "--bypass",
        default=",".join(DEFAULT_BYPASS),
        help="comma-separated hosts/CIDRs reached directly (default: loopback + private nets)",
    )
    actions.add_parser("restore", help="restore the settings saved before 'set' or a crash")
    parser.set_defaults(func=run_sysproxy_command)
    return parser


def run_sysproxy_command(
    args: argparse.Namespace,
    *,
    factory: ProxyFactory | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run a parsed ``sysproxy`` command; returns the process exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    make = factory or SystemProxy.for_this_system
    try:
        proxy = make(args.backend)
        action = args.sysproxy_action
        if action == "status":
            print(proxy.status().describe(), file=out)
        elif action == "set":
            bypass = tuple(b.strip() for b in args.bypass.split(",") if b.strip())
            proxy.apply(args.host, args.port, bypass)
            print(f"system proxy set to {args.host}:{args.port}", file=out)
            print(
                f"previous settings saved in {proxy.state_path}; "
                "undo with 'ostp-client sysproxy restore'",
                file=out,
            )
        elif action == "restore":
            if proxy.restore():
                print("system proxy settings restored", file=out)
            else:
                print("nothing to restore (no saved settings)", file=out)
        else:  # argparse enforces the choices
            print(f"unknown action {action!r}", file=err)
            return 2
    except (SystemProxyError, ValueError) as exc:
        print(f"ostp-client sysproxy: {exc}", file=err)
        return 1
    return 0
