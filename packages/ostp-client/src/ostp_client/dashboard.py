"""`ostp-client tui`: start the dashboard (the `ostp-tui` package) with this Python.

The dashboard is a separate package (the `[tui]` extra); pipx exposes only `ostp-client`'s own
commands, so this is how a pipx user reaches it. It runs as a child process (`python -m
ostp_tui`): the client never imports the TUI.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from ostp_client.cli import EXIT_FAILURE, command

__all__ = ["run_dashboard"]


def _configure(parser: argparse.ArgumentParser) -> None:
    # the options of `ostp-tui` itself (ostp_tui.app.main), passed on as given
    parser.add_argument("--socket", default=None, help="control socket of the daemon")
    parser.add_argument(
        "--log-level", default=None, help="initial log filter: debug, info, warning or error"
    )


@command("tui", "open the dashboard (needs the tui extra: ostp-client[tui])", _configure)
def run_dashboard(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ostp_tui") is None:
        print(
            "the dashboard is not installed; install it with\n"
            "  pipx install --force 'ostp-client[tui]'   (or: pip install 'ostp-client[tui]')",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    argv = [sys.executable, "-m", "ostp_tui"]
    if args.socket is not None:
        argv += ["--socket", args.socket]
    if args.log_level is not None:
        argv += ["--log-level", args.log_level]
    try:
        return subprocess.call(argv)  # noqa: S603 (our own interpreter and package)
    except KeyboardInterrupt:
        return 130
