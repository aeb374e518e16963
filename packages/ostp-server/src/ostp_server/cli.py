"""``ostp-server``: run, gen-key, links."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import anyio

from ostp_proto.address import format_host_port
from ostp_proto.transport import encode_key, generate_keypair

from .config import ConfigError, ServerConfig, load_config
from .server import OstpServer

log = logging.getLogger("ostp_server")


def generate_key() -> str:
    """16 random bytes as 32 lowercase hex characters."""
    return os.urandom(16).hex()


def generate_reality_keys() -> dict[str, str]:
    """A Reality key pair (base64url, as upstream writes them) and a random short id."""
    private, public = generate_keypair()
    return {
        "private_key": encode_key(private),
        "public_key": encode_key(public),
        "short_id": os.urandom(8).hex(),
    }


TRANSPORTS = ("udp", "tcp", "wss", "reality")


def share_links(config: ServerConfig, host: str, transport: str = "udp") -> list[str]:
    """Share links (spec §10.9) for every access key, port of the first listen address.

    ``transport``: ``udp`` (``ostp://KEY@HOST:PORT``), ``tcp`` (``?type=tcp``), ``wss``
    (``?type=tcp&wss=true``), ``reality`` (``?security=reality&sni=…&pbk=…&sid=…&type=tcp``)
    or ``all`` (each one the server offers, in that order).
    """
    port = config.listen_addresses[0][1]
    where = format_host_port(host.strip("[]"), port)
    reality = config.reality_enabled
    queries: list[str] = []
    for kind in TRANSPORTS if transport == "all" else (transport,):
        if kind == "udp":
            queries.append("")
        elif kind in ("tcp", "wss") and config.tcp:
            queries.append("?type=tcp" + ("&wss=true" if kind == "wss" else ""))
        elif kind == "reality" and config.tcp and reality is not None:
            queries.append(
                f"?security=reality&sni={reality.server_names[0]}"
                f"&pbk={reality.public_key_text}&sid={reality.short_id}&type=tcp"
            )
        elif transport != "all":
            raise ValueError(f"this server does not offer {kind}")
    return [f"ostp://{key}@{where}{q}" for key in config.key_strings() for q in queries]


SHUTDOWN_GRACE = 1.5
"""Seconds from SIGINT/SIGTERM until the process exits even if the graceful stop hangs."""


class _Shutdown:
    """SIGINT/SIGTERM end the server: gracefully at once, by force after SHUTDOWN_GRACE.

    Plain ``signal.signal`` handlers, not the event loop's: Python runs them between two
    bytecodes of the main thread even while the loop is stuck in a busy callback, so a
    watchdog thread can still end a server whose loop never turns again. A second signal
    exits at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._scope: anyio.CancelScope | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    def install(self, scope: anyio.CancelScope) -> None:
        """Route the signals to ``scope`` (call from the event loop's thread)."""
        self._scope = scope
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self._force_exit()
        self.signum = signum
        self._watchdog = threading.Timer(SHUTDOWN_GRACE, self._force_exit)
        self._watchdog.daemon = True
        self._watchdog.start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        assert self.signum is not None and self._scope is not None
        log.info("%s: shutting down", signal.Signals(self.signum).name)
        self._scope.cancel()

    def _force_exit(self) -> None:
        name = signal.Signals(self.signum).name if self.signum is not None else "signal"
        # os.write, not logging: the stuck main thread may hold the logging lock
        os.write(
            2, f"ostp-server: {name}: not stopped after {SHUTDOWN_GRACE} s; exiting\n".encode()
        )
        os._exit(1)


async def _run(server: OstpServer, shutdown: _Shutdown) -> int:
    async with anyio.create_task_group() as tg:
        shutdown.install(tg.cancel_scope)
        await tg.start(server.run)
        if server.config.metrics is not None:
            from .metrics import serve_metrics  # noqa: PLC0415 (prometheus only when asked)

            try:
                await tg.start(serve_metrics, server, server.config.metrics)
            except OSError as e:
                print(f"ostp-server: {e.strerror or e}", file=sys.stderr)
                tg.cancel_scope.cancel()
                return 1
    return 0


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
    gen = sub.add_parser("gen-key", help="print a new random access key")
    gen.add_argument(
        "--reality",
        action="store_true",
        help="print a Reality private_key, public_key (pbk) and short_id instead",
    )
    links = sub.add_parser("links", help="print ostp:// share links for every key")
    links.add_argument("-c", "--config", required=True, help="server.json")
    links.add_argument("--host", required=True, help="host name or IP clients connect to")
    links.add_argument(
        "--transport",
        choices=[*TRANSPORTS, "all"],
        default="all",
        help="which links: one transport, or every one the server offers (default)",
    )
    args = parser.parse_args(argv)

    if args.command == "gen-key":
        if args.reality:
            for name, value in generate_reality_keys().items():
                print(f"{name}: {value}")
        else:
            print(generate_key())
        return 0
    config = _load(args.config)
    if args.command == "links":
        try:
            found = share_links(config, args.host, args.transport)
        except ValueError as e:
            print(f"ostp-server: {e}", file=sys.stderr)
            return 2
        for link in found:
            print(link)
        return 0
    logging.basicConfig(
        level=config.effective_log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for key in config.ignored_keys():
        log.warning("config key %r is not used by this server; ignored", key)
    server = OstpServer(config)
    try:
        server.bind()  # here, so a busy port is one line, not an exception group
    except OSError as e:
        print(f"ostp-server: {e.strerror or e}", file=sys.stderr)
        return 1
    shutdown = _Shutdown()
    status = 0
    try:
        status = anyio.run(_run, server, shutdown)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown.uninstall()
        server.close_sockets()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
