"""``ostp-server``: run, gen-key, links."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio

from .config import ConfigError, ServerConfig, format_host_port, load_config
from .server import serve

log = logging.getLogger("ostp_server")


def generate_key() -> str:
    """16 random bytes as 32 lowercase hex characters."""
    return os.urandom(16).hex()


def share_links(config: ServerConfig, host: str) -> list[str]:
    """``ostp://KEY@HOST:PORT`` per access key (spec §10.9), port of the first listen address."""
    port = config.listen_addresses[0][1]
    where = format_host_port(host.strip("[]"), port)
    return [f"ostp://{key}@{where}" for key in config.key_strings()]


async def _run(config: ServerConfig) -> None:
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(on_signal)
        await tg.start(serve, config)


def _load(path: str) -> ServerConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"ostp-server: {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ostp-server", description="Reference OSTP server")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve until SIGINT/SIGTERM")
    run.add_argument("-c", "--config", required=True, help="server.json")
    sub.add_parser("gen-key", help="print a new random access key")
    links = sub.add_parser("links", help="print ostp:// share links for every key")
    links.add_argument("-c", "--config", required=True, help="server.json")
    links.add_argument("--host", required=True, help="host name or IP clients connect to")
    args = parser.parse_args(argv)

    if args.command == "gen-key":
        print(generate_key())
        return 0
    config = _load(args.config)
    if args.command == "links":
        for link in share_links(config, args.host):
            print(link)
        return 0
    logging.basicConfig(
        level=config.effective_log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for key in config.ignored_keys():
        log.warning("config key %r is not used by this server; ignored", key)
    try:
        anyio.run(_run, config)
    except OSError as e:
        print(f"ostp-server: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
