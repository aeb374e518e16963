"""Soak: a browser-like mix through one OSTP session, then nothing may be left behind.

Real processes on loopback: ``ostp-server run`` (restarted in the middle of the mix: SIGTERM,
later SIGKILL, each time started again on the same port with the same key and replay cache),
``ostp-client run`` with one session (``mux`` off) and its own control socket, and the HTTP
origin of the proxy tests. The load (:mod:`tests.soak.mix`) runs here, with a fixed seed:
short GETs (keep-alive or not, SOCKS5, HTTP proxy, CONNECT), 1-20 MB uploads and downloads,
slow and paused readers, slow origins, clients that abort with RST and FIN, real curl, proxy clients
that send nothing, half a greeting or garbage, and control clients that vanish.

Phases: a warm-up round of the same mix without restarts, so the daemon's allocator has grown
to its working size; then the baseline (descriptors, RSS) once no connection is live; then the
mix with the restarts; then the checks:

- every completed transfer byte-exact; no clean end before a body was complete ("short
  success"); no operation past its deadline (each hang is named); errors only for operations
  that overlapped a restart (from the server's stop until a fresh GET works again);
- zero live connections (``connections`` on the control socket) within 60 s, and no TCP socket
  of the daemon in CLOSE-WAIT;
- the daemon's descriptors within ``FD_MARGIN`` of the baseline and its RSS within
  ``RSS_MARGIN_KIB`` or ``RSS_MARGIN_FRACTION`` (whichever is larger) of the larger of the
  baseline and the warm-up's peak, see below;
- the server: one live session, no TCP connection to the origin left, descriptors within
  ``FD_MARGIN`` of its own baseline;
- both still answer: a fresh curl through each proxy protocol, ``status`` on the control
  socket; neither logged a traceback; the daemon exits 0 on SIGTERM.

``run_soak`` returns a :class:`Report` (figures and failures); ``tests/soak/test_soak.py`` runs
it bounded for CI, ``scripts/soak [--seconds N] [--seed S]`` for as long as you like.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ostp_client.control.client import ControlClient, ControlConnectionError
from tests.client.leak_helpers import close_wait_sockets, fd_count, rss_kib, tcp_sockets
from tests.client.origin_server import seeded_bytes
from tests.client.proxy_helpers import CURL, proxy_args, run_origin
from tests.client.tunnel_helpers import ServerProcess
from tests.soak.mix import SHORT_GET_LIMIT, Mix, figures
from tests.tui.live import program, short_socket_dir

FD_MARGIN = 5
"""Descriptors the daemon (or server) may hold above its baseline after the mix. Idle, the
daemon holds a fixed set (listeners, control socket, the session's UDP socket, the event loop,
log file); a control client of ours being closed while we count can add one or two. One
leaked connection per thousand would already exceed it over a soak."""
RSS_MARGIN_KIB = 10 * 1024
RSS_MARGIN_FRACTION = 0.10
"""RSS may end this much above the baseline (the larger of the two). CPython's allocator and
glibc's malloc keep freed arenas mapped and fragmentation varies with the interleaving of
transfers, so RSS after load never returns exactly; the baseline is taken after a warm-up round
of the same mix so that the first growth to working size is not counted. Leaked buffers of
1-20 MB transfers, or per-connection state over thousands of connections, exceed it.

The reference is the larger of the baseline and the peak RSS during the warm-up: once the
baseline is taken, the first transfers of the mix may grow the allocator back to the working
size the warm-up already reached (seen: 64 -> 80 MiB in the mix's first 3 s, then flat; with
64 KB datagrams the swings are larger). A leak grows past that working size; the live
connections, CLOSE-WAIT and descriptor checks catch per-connection leaks directly."""
SETTLE_LIMIT = 30.0
"""Seconds to wait for the daemon to show no live connection after the mix."""
RECOVERY_LIMIT = 60.0
"""Seconds for the tunnel to carry a fresh GET after a server restart."""


@dataclass(frozen=True)
class Settings:
    seconds: float = 60.0
    """Length of the mix after the warm-up."""
    seed: int = 1
    warmup: float = 10.0
    restarts: tuple[tuple[float, str], ...] = ((0.35, "term"), (0.7, "kill"))
    """(fraction of the mix, how): when the server is stopped (SIGTERM or SIGKILL) and started
    again."""
    min_transfer: int = 1 << 20
    max_transfer: int = 20 << 20
    handshake_timeout: float = 10.0
    """The daemon's inbound handshake_timeout (clients that never finish their greeting)."""
    idle_timeout: float = 10.0
    """The ostp outbound's idle_timeout: how long a session survives a silently dead server
    (SIGKILL) before it is re-established."""


@dataclass
class Report:
    settings: Settings
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    def text(self) -> str:
        verdict = "PASSED" if not self.failures else f"FAILED ({len(self.failures)})"
        return "\n".join([*self.lines, f"soak {verdict}"])


class Daemon:
    """``ostp-client run`` with its log in a file."""

    def __init__(self, workdir: Path, server: ServerProcess, settings: Settings) -> None:
        self.control = str(short_socket_dir() / "control.sock")
        self.config = workdir / "client.json"
        self.log_path = workdir / "client.log"
        outbound = server.outbound(
            mux={"enabled": False},
            idle_timeout=settings.idle_timeout,
            reconnect_delay=1.0,
        )
        self.config.write_text(
            json.dumps(
                {
                    "inbounds": [
                        {
                            "type": "local_proxy",
                            "tag": "proxy-in",
                            "port": 0,
                            "handshake_timeout": settings.handshake_timeout,
                        }
                    ],
                    "outbounds": [outbound],
                    "routing": {"default_outbound": outbound["tag"]},
                    "control": {"socket": self.control},
                    "log": {"level": "info"},
                }
            )
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*program(), "run", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    async def client(self) -> ControlClient:
        return await ControlClient.connect(self.control)

    async def proxy_port(self) -> int:
        with anyio.fail_after(30):
            while True:
                if not self.alive():
                    raise AssertionError(f"ostp-client exited:\n{self.log()[-3000:]}")
                try:
                    async with await self.client() as client:
                        status = await client.status()
                    for inbound in status.inbounds:
                        if inbound.tag == "proxy-in" and inbound.listen:
                            return int(inbound.listen[0].rsplit(":", 1)[1])
                except ControlConnectionError:
                    pass
                await anyio.sleep(0.05)

    async def live_connections(self) -> int:
        async with await self.client() as client:
            return len((await client.connections()).connections)

    def stop(self) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None
        finally:
            directory = Path(self.control).parent
            if directory.exists():
                for leftover in directory.iterdir():
                    leftover.unlink()
                directory.rmdir()


def free_closed_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def server_sessions(server: ServerProcess) -> int:
    """Live sessions of the running server instance, from its log."""
    log = (server.workdir / "server.log").read_text(errors="replace")
    current = log.rsplit("listening on udp", 1)[-1]
    return current.count(" started from ") - current.count(" ended (")


def origin_connections(pid: int, origin_port: int) -> list[str]:
    """The process's TCP connections to or from the origin's port (any state but TIME-WAIT)."""
    port_hex = f":{origin_port:04X}"
    return [
        f"{state} {local} -> {remote}"
        for state, local, remote in tcp_sockets(pid)
        if remote.endswith(port_hex) and state != "TIME-WAIT"
    ]


async def settle(predicate: Callable[[], bool], limit: float) -> bool:
    with anyio.move_on_after(limit):
        while not predicate():  # noqa: ASYNC110 (counters in /proc, not events)
            await anyio.sleep(0.1)
        return True
    return predicate()


async def fresh_get(mix: Mix, via: str) -> str:
    """A new GET of 1 MB through the proxy: '' when it came back whole, else what happened."""
    op = mix.new_op("probe", via, 1 << 20)
    op.phase = "probe"

    async def work() -> None:
        conn, prefix = await mix.open(via)
        try:
            await mix.get(conn, prefix, op, seed=int(time.monotonic() * 1000) & 0xFFFF)
        finally:
            await conn.aclose()

    await mix.guarded(op, SHORT_GET_LIMIT, work)
    mix.ops.remove(op)  # probes are not part of the mix's figures
    return "" if op.outcome == "ok" else f"{op.outcome} {op.error}"


async def restart_server(
    mix: Mix, server: ServerProcess, how: str, report: Report, at: float
) -> None:
    await anyio.sleep(max(0.0, at - mix.now()))
    stopped = mix.now()
    assert server.process is not None
    try:
        if how == "kill":
            server.process.kill()
            server.process.wait(10)
            server.process = None
        else:
            await anyio.to_thread.run_sync(server.stop)
        await anyio.to_thread.run_sync(server.start)
    except (AssertionError, OSError, subprocess.SubprocessError) as exc:
        mix.windows.append((stopped, float("inf")))
        report.check(False, f"server restart ({how}) at {stopped:.1f} s: {exc}")
        return
    recovered = None
    with anyio.move_on_after(RECOVERY_LIMIT):
        while await fresh_get(mix, "socks5"):  # noqa: ASYNC110 (probing, not waiting)
            await anyio.sleep(0.2)  # spacing the probes
        recovered = mix.now()
    mix.windows.append((stopped, recovered if recovered is not None else float("inf")))
    report.check(
        recovered is not None,
        f"server restart ({how}) at {stopped:.1f} s: a fresh GET works again after "
        + (f"{recovered - stopped:.1f} s" if recovered is not None else "never"),
    )


async def curl_get(port: int, origin_port: int, mode: str) -> str:
    """A real curl GET through the proxy: '' when the body came back whole."""
    size = 300_000
    url = f"http://127.0.0.1:{origin_port}/seeded/77/{size}"
    with anyio.fail_after(SHORT_GET_LIMIT):
        done = await anyio.run_process(
            [CURL, "-sS", "--noproxy", "", *proxy_args(mode, port), url], check=False
        )
    if done.returncode != 0:
        return f"curl exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}"
    if done.stdout != seeded_bytes(77, 0, size):
        return f"{len(done.stdout)} bytes, not the {size} sent"
    return ""


async def run_soak(settings: Settings, workdir: Path) -> Report:
    """The whole soak in ``workdir``; never raises for what it found (see Report.failures)."""
    report = Report(settings)
    began = time.monotonic()
    with ExitStack() as stack:
        origin = stack.enter_context(run_origin())
        server = ServerProcess(workdir)
        await anyio.to_thread.run_sync(server.start)
        stack.callback(server.stop)
        daemon = Daemon(workdir, server, settings)
        stack.callback(daemon.stop)
        mix = Mix(
            proxy_port=await daemon.proxy_port(),
            origin_port=origin.port,
            closed_port=free_closed_port(),
            control_path=daemon.control,
            seed=settings.seed,
            handshake_timeout=settings.handshake_timeout,
            min_transfer=settings.min_transfer,
            max_transfer=settings.max_transfer,
        )
        problem = f"no answer within {RECOVERY_LIMIT:.0f} s"
        with anyio.move_on_after(RECOVERY_LIMIT):
            while problem := await fresh_get(mix, "socks5"):  # noqa: ASYNC110 (probing)
                await anyio.sleep(0.2)
        report.check(not problem, f"the tunnel carries a first GET {problem}".rstrip())
        if problem:
            return report

        # warm-up (its peak RSS noted: the working size of this mix), then the baseline
        warmup_peak = 0

        async def sample_warmup() -> None:
            nonlocal warmup_peak
            while daemon.alive():
                with suppress(OSError, AssertionError):
                    warmup_peak = max(warmup_peak, rss_kib(daemon.pid))
                await anyio.sleep(1.0)

        async with anyio.create_task_group() as sampling:
            sampling.start_soon(sample_warmup)
            await mix.run(settings.warmup)
            sampling.cancel_scope.cancel()
        if not both_alive(daemon, server, report, "after the warm-up"):
            summarize(report, mix, "stopped after the warm-up", [])
            return report
        quiet = await settle_connections(daemon, report, "after the warm-up")
        base_fds, base_rss = fd_count(daemon.pid), rss_kib(daemon.pid)
        assert server.process is not None
        server_base_fds = fd_count(server.process.pid)

        # the mix, with the restarts
        mix.phase = "mix"
        mix_began = mix.now()
        samples: list[tuple[float, int, int]] = []

        async def sample() -> None:
            while daemon.alive():  # the daemon's RSS and descriptors through the mix
                with suppress(OSError, AssertionError):  # (it may end between the two reads)
                    at = mix.now() - mix_began
                    samples.append((at, rss_kib(daemon.pid), fd_count(daemon.pid)))
                await anyio.sleep(max(1.0, settings.seconds / 20))

        async with anyio.create_task_group() as sampling:
            sampling.start_soon(sample)
            async with anyio.create_task_group() as tg:  # ends when the restarts are done too
                for fraction, how in settings.restarts:
                    at = mix_began + fraction * settings.seconds
                    tg.start_soon(restart_server, mix, server, how, report, at)
                await mix.run(settings.seconds)
            sampling.cancel_scope.cancel()
        mix_seconds = mix.now() - mix_began

        summarize(report, mix, f"mix {settings.seconds:.0f} s (ran {mix_seconds:.1f} s)", samples)

        # nothing left behind
        if not both_alive(daemon, server, report, "after the mix"):
            return report
        quiet = await settle_connections(daemon, report, "after the mix") and quiet
        if quiet:
            await settle(lambda: fd_count(daemon.pid) <= base_fds + FD_MARGIN, 20)
        fds, rss = fd_count(daemon.pid), rss_kib(daemon.pid)
        close_wait = close_wait_sockets(daemon.pid)
        report.check(not close_wait, f"daemon sockets in CLOSE-WAIT: {len(close_wait)}")
        report.check(
            fds <= base_fds + FD_MARGIN,
            f"daemon descriptors: {base_fds} at the baseline, {fds} at the end "
            f"(margin +{FD_MARGIN})",
        )
        rss_margin = max(RSS_MARGIN_KIB, int(base_rss * RSS_MARGIN_FRACTION))
        working = max(base_rss, warmup_peak)
        report.check(
            rss <= working + rss_margin,
            f"daemon RSS: {base_rss / 1024:.1f} MiB at the baseline (warm-up peak "
            f"{warmup_peak / 1024:.1f}), {rss / 1024:.1f} MiB at the end "
            f"(margin +{rss_margin / 1024:.1f} MiB over the larger)",
        )
        assert server.process is not None
        server_pid = server.process.pid
        await settle(lambda: not origin_connections(server_pid, origin.port), 20)
        left = origin_connections(server_pid, origin.port)
        report.check(not left, f"server connections to the origin left: {left}")
        await settle(lambda: fd_count(server_pid) <= server_base_fds + FD_MARGIN, 20)
        server_fds = fd_count(server_pid)
        report.check(
            server_fds <= server_base_fds + FD_MARGIN,
            f"server descriptors: {server_base_fds} at the baseline, {server_fds} at the end",
        )
        sessions = server_sessions(server)
        report.check(sessions == 1, f"server live sessions at the end: {sessions}")

        # both still answer
        for mode in ("socks5h", "http"):
            problem = await curl_get(mix.proxy_port, origin.port, mode)
            report.check(not problem, f"a fresh curl GET via {mode} {problem}".rstrip())
        try:
            async with await daemon.client() as client:
                status = await client.status()
            report.check(
                True,
                f"control status answers: {status.connections_closed} connections served, "
                f"{status.connections_live} live",
            )
        except (ControlConnectionError, OSError) as exc:
            report.check(False, f"control status answers: {exc}")
        code = await anyio.to_thread.run_sync(daemon.stop)
        report.check(code == 0, f"the daemon exits 0 on SIGTERM (exit status {code})")
        server_log = (server.workdir / "server.log").read_text(errors="replace")
        for name, text in (("daemon", daemon.log()), ("server", server_log)):
            report.check("Traceback" not in text, f"no traceback in the {name}'s log")
    report.lines.append(f"duration: {time.monotonic() - began:.1f} s, work directory {workdir}")
    return report


def summarize(report: Report, mix: Mix, what: str, samples: list[tuple[float, int, int]]) -> None:
    """The figures of the operations (at the top of the report) and their checks."""
    warmup = sum(op.phase == "warmup" for op in mix.ops)
    settings = report.settings
    report.lines[:0] = [
        f"soak: seed {settings.seed}, warm-up {settings.warmup:.0f} s, {what}, "
        f"{warmup} + {len(mix.ops) - warmup} operations",
        *figures(mix),
        "disruption windows (server stopped .. fresh GET works): "
        + ", ".join(f"{a:.1f}..{b:.1f} s" for a, b in mix.windows),
        "daemon during the mix (s: RSS MiB/descriptors): "
        + " ".join(f"{t:.0f}:{rss / 1024:.0f}/{fds}" for t, rss, fds in samples),
    ]
    failed = mix.failures()
    for op in failed[:40]:
        report.lines.append(f"  failed: {op.describe()}")
    report.check(
        not failed,
        f"{len(failed)} operations failed (short/mismatch/hang/wrong/error outside a restart)",
    )
    for outcome in ("short", "mismatch", "hang"):
        count = sum(op.outcome == outcome for op in mix.ops)
        report.check(count == 0, f"{count} operations ended '{outcome}'")


def both_alive(daemon: Daemon, server: ServerProcess, report: Report, when: str) -> bool:
    """Both processes still run (else what their logs end with goes into the report)."""
    server_alive = server.process is not None and server.process.poll() is None
    report.check(daemon.alive(), f"the daemon runs {when}")
    report.check(server_alive, f"the server runs {when}")
    if not daemon.alive():
        report.lines.append(daemon.log()[-3000:])
    if not server_alive:
        report.lines.append((server.workdir / "server.log").read_text(errors="replace")[-3000:])
    return daemon.alive() and server_alive


async def settle_connections(daemon: Daemon, report: Report, when: str) -> bool:
    """Wait (bounded) until the daemon lists no live connection; record the check."""
    live = -1
    began = time.monotonic()
    with anyio.move_on_after(SETTLE_LIMIT):
        while True:
            try:
                live = await daemon.live_connections()
            except (ControlConnectionError, OSError):
                live = -1
            if live == 0:
                break
            await anyio.sleep(0.2)
    report.check(
        live == 0,
        f"live connections {when}: {live} (waited {time.monotonic() - began:.1f} s)",
    )
    return live == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the mix")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=20.0, help="warm-up round (seconds)")
    parser.add_argument(
        "--no-kill", action="store_true", help="restart the server with SIGTERM only"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    restarts: tuple[tuple[float, str], ...] = (
        ((0.35, "term"),)
        if args.no_kill
        else (
            (0.35, "term"),
            (0.7, "kill"),
        )
    )
    settings = Settings(seconds=args.seconds, seed=args.seed, warmup=args.warmup, restarts=restarts)
    workdir = Path(tempfile.mkdtemp(prefix="ostp-soak-"))
    report = anyio.run(run_soak, settings, workdir)
    print(report.text(), flush=True)
    if not report.failures and not args.keep:
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        workdir.rmdir()
    elif report.failures:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
