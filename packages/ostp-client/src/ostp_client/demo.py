"""`ostp-client demo`: a local ostp-server with a fresh key, the client, and an origin to fetch.

Everything listens on 127.0.0.1 only. The server runs as a child process (`python -m
ostp_server`), so the client package never imports the server; a small HTTP origin runs in a
thread so that `curl` through the proxy has something to fetch without any internet access.
The client serves the default control socket, so `ostp-tui` in another terminal attaches with
no arguments (a private socket, and the `--socket` to pass, when a daemon already serves it).
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio

from ostp_client.cli import EXIT_FAILURE, EXIT_OK, command, setup_logging
from ostp_client.config import ClientConfig
from ostp_client.control.protocol import default_socket_path
from ostp_client.control.server import ControlServer
from ostp_client.daemon import Daemon
from ostp_client.inbounds.base import StartError

logger = logging.getLogger(__name__)

DEMO_PAGE = b"Hello from the ostp-py demo origin: this page came through the OSTP tunnel.\n"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Origin(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            try:
                size = min(int(self.path.rsplit("/", 1)[1]), 1 << 30)
            except ValueError:
                size = 0
            body = None
        else:
            body = DEMO_PAGE
            size = len(body)
        self.send_response(200)
        kind = "application/octet-stream" if body is None else "text/plain"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)
            return
        block = os.urandom(65536)
        while size > 0:
            self.wfile.write(block[: min(size, len(block))])
            size -= len(block)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("origin: " + format, *args)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=1088, help="local proxy port (default 1088)")
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default Ctrl-C)"
    )
    parser.add_argument("--log-level", default="info", help="log level (default info)")


def _unix_socket_is_live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _control_path(workdir: Path) -> str:
    """The default control socket, unless a running daemon already serves it."""
    default = default_socket_path()
    if sys.platform == "win32" or not _unix_socket_is_live(default):
        return default
    return str(workdir / "control.sock")


def _server_command(config_path: Path) -> list[str]:
    exe = shutil.which("ostp-server")
    if exe is not None:
        return [exe, "run", "-c", str(config_path)]
    return [sys.executable, "-m", "ostp_server", "run", "-c", str(config_path)]


@command("demo", "run a local ostp-server, the client and a test origin on loopback", _configure)
def run_demo(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    key = secrets.token_hex(16)
    server_port = _free_port(socket.SOCK_DGRAM)
    workdir = Path(tempfile.mkdtemp(prefix="ostp-demo-"))
    server_config = workdir / "server.json"
    server_config.write_text(
        json.dumps({"listen": f"127.0.0.1:{server_port}", "access_keys": [key]}, indent=2)
    )
    server_config.chmod(0o600)
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    origin_port = origin.server_address[1]
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    control = _control_path(workdir)
    client_config = ClientConfig.model_validate(
        {
            "log": {"level": args.log_level},
            "inbounds": [
                {
                    "type": "local_proxy",
                    "tag": "proxy-in",
                    "listen": "127.0.0.1",
                    "port": args.port,
                }
            ],
            "outbounds": [
                {
                    "type": "ostp",
                    "tag": "proxy",
                    "server": f"127.0.0.1:{server_port}",
                    "access_key": key,
                },
                {"type": "direct", "tag": "direct"},
                {"type": "block", "tag": "block"},
            ],
            "routing": {"rules": [], "default_outbound": "proxy"},
            "control": {"socket": control},
        }
    )
    (workdir / "client.json").write_text(
        client_config.model_dump_json(indent=2, context={"reveal_secrets": True})
    )
    (workdir / "client.json").chmod(0o600)
    server = subprocess.Popen(_server_command(server_config))  # noqa: S603 (our own program)
    try:
        return anyio.run(_run, client_config, args, server_port, origin_port, workdir, server)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        origin.shutdown()
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(
    config: ClientConfig,
    args: argparse.Namespace,
    server_port: int,
    origin_port: int,
    workdir: Path,
    server: subprocess.Popen[bytes],
) -> int:
    daemon = Daemon(config)
    async with anyio.create_task_group() as tg:
        try:
            control = ControlServer(daemon, config_path=str(workdir / "client.json"))
            try:
                await tg.start(control.run)  # removes its socket when the demo stops
            except StartError:
                if control.path == str(workdir / "control.sock"):
                    raise
                # a daemon took the default socket after we looked: use one of our own
                control = ControlServer(
                    daemon, str(workdir / "control.sock"), config_path=str(workdir / "client.json")
                )
                await tg.start(control.run)
            await tg.start(daemon.run)
            outbound = daemon.outbounds["proxy"]
            deadline = time.monotonic() + 15
            while outbound.status().state != "connected":
                if server.poll() is not None or time.monotonic() > deadline:
                    print("demo: the local ostp-server did not come up; see its log above.")
                    return EXIT_FAILURE
                await anyio.sleep(0.05)
            print(_banner(args.port, server_port, origin_port, workdir), flush=True)
            print(_watch_line(control), flush=True)
            if args.duration is not None:
                await anyio.sleep(args.duration)
            else:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
        finally:
            daemon.stop()
            tg.cancel_scope.cancel()
    return EXIT_OK


def _banner(port: int, server_port: int, origin_port: int, workdir: Path) -> str:
    return f"""
ostp-py demo is running (loopback only; Ctrl-C stops it).
  OSTP server   127.0.0.1:{server_port}/udp  (fresh key; configs in {workdir})
  local proxy   127.0.0.1:{port}  (SOCKS5 and HTTP on one port)
  test origin   http://127.0.0.1:{origin_port}/

Try it:
  curl -x socks5h://127.0.0.1:{port} http://127.0.0.1:{origin_port}/
  curl -x http://127.0.0.1:{port} http://127.0.0.1:{origin_port}/
  curl -x socks5h://127.0.0.1:{port} -o /dev/null -w '%{{speed_download}} B/s\\n' \\
       http://127.0.0.1:{origin_port}/bytes/100000000"""


def _watch_line(control: ControlServer) -> str:
    """The last line of the "Try it" text: how to open the dashboard on this demo."""
    path = control.path
    if not control.listening:
        return f"  (no dashboard: the control socket {path} is not available; see the log above)\n"
    command = "ostp-tui" if path == default_socket_path() else f"ostp-tui --socket {path}"
    where = "in a second terminal"
    if os.environ.get("HATCH_ENV_ACTIVE"):  # `hatch run` put ostp-tui on this PATH only
        where += f" (from this checkout: hatch run {command})"
    return f"  # {where}:\n  watch it: {command}\n"
