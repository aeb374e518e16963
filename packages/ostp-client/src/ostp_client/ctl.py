"""`ostp-client ctl status | connections | routes | logs | reconnect | select | delay | close |
reload`.

Talks to a running daemon through the control socket and prints tables (or JSON with
`--json`). Exit status: 0 ok, 1 the daemon refused the request, 3 no daemon at the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ostp_client.cli import command
from ostp_client.control.client import ControlClient, ControlConnectionError, ControlError
from ostp_client.control.protocol import (
    LEVELS,
    ConnectionList,
    DaemonStatus,
    DelayResult,
    LogBatch,
    RouteTable,
    default_socket_path,
    format_bytes,
)

__all__ = ["format_table"]

EXIT_REFUSED = 1
EXIT_NO_DAEMON = 3


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _status_text(status: DaemonStatus) -> str:
    head = (
        f"ostp-client {status.version} (pid {status.pid}): {status.state}, "
        f"up {status.uptime:.0f} s, {status.connections_live} live connection(s), "
        f"{status.connections_closed} closed"
    )
    rows = []
    for o in status.outbounds:
        rows.append(
            [
                o.id,
                o.type,
                o.state,
                o.server or "-",
                o.transport or "-",
                f"{o.rtt_ms:.1f}" if o.rtt_ms is not None else "-",
                format_bytes(o.bytes_up),
                format_bytes(o.bytes_down),
                f"{format_bytes(o.rate_up)}/s",
                f"{format_bytes(o.rate_down)}/s",
                o.reconnects,
                _drops_text(o.kernel_drops),
                "-",
                o.mapped_address or "-",
            ]
        )
        for s in o.sessions:
            rows.append(
                [
                    f"  #{s.id}",
                    "",
                    s.state,
                    s.server or "-",
                    s.transport or "-",
                    f"{s.rtt_ms:.1f}" if s.rtt_ms is not None else "-",
                    format_bytes(s.bytes_up),
                    format_bytes(s.bytes_down),
                    f"{format_bytes(s.rate_up)}/s",
                    f"{format_bytes(s.rate_down)}/s",
                    s.reconnects,
                    _drops_text(s.kernel_drops),
                    format_bytes(s.socket_buffer) if s.socket_buffer is not None else "-",
                    s.mapped_address or "-",
                ]
            )
    headers = [
        "OUTBOUND",
        "TYPE",
        "STATE",
        "SERVER",
        "TRANSPORT",
        "RTT ms",
        "UP",
        "DOWN",
        "UP/s",
        "DOWN/s",
        "RECONN",
        "KDROPS",
        "SOCKBUF",
        "MAPPED",
    ]
    inbound_rows = [[i.tag, i.type, ", ".join(i.listen), i.accepted] for i in status.inbounds]
    parts = [head, format_table(headers, rows)]
    groups = [o for o in status.outbounds if o.members]
    if groups:
        parts.append(_groups_text(groups))
    parts.append(format_table(["INBOUND", "TYPE", "LISTEN", "ACCEPTED"], inbound_rows))
    return "\n\n".join(parts)


def _drops_text(drops: int | None) -> str:
    return "-" if drops is None else str(drops)


def _delay_text(delay_ms: float | None, error: str | None, alive: bool | None) -> str:
    if alive is False:
        return f"down: {error}" if error else "down"
    return f"{delay_ms:.0f} ms" if delay_ms is not None else "-"


def _groups_text(groups: Sequence[Any]) -> str:
    """Each group, its members' last delays, and the one in use (`*`)."""
    rows = []
    for group in groups:
        chain = " -> ".join(group.chain) if group.chain else group.selected
        rows.append([group.id, group.type, f"using {chain}", "", ""])
        for member in group.members:
            mark = "*" if member.tag == group.selected else " "
            rows.append(
                [
                    f"  {mark} {member.tag}",
                    member.type,
                    member.state,
                    _delay_text(member.delay_ms, member.error, member.alive),
                    time.strftime("%H:%M:%S", time.localtime(member.checked_at))
                    if member.checked_at
                    else "",
                ]
            )
    return format_table(["GROUP", "TYPE", "STATE", "DELAY", "CHECKED"], rows)


def _connections_text(conns: ConnectionList) -> str:
    rows = [
        [
            c.id,
            c.inbound,
            c.network,
            c.destination or "-",
            "default" if c.rule is None else c.rule,
            " -> ".join([c.outbound or "-", *c.via[1:]]) if c.via else (c.outbound or "-"),
            format_bytes(c.bytes_up),
            format_bytes(c.bytes_down),
            f"{max(0.0, conns.time - c.started_at):.0f} s",
        ]
        for c in conns.connections
    ]
    headers = ["ID", "INBOUND", "NET", "DESTINATION", "RULE", "OUTBOUND", "UP", "DOWN", "AGE"]
    return format_table(headers, rows)


def _routes_text(routes: RouteTable) -> str:
    rows = [
        ["-" if r.index is None else r.index, r.match, r.outbound, r.hits] for r in routes.rules
    ]
    return format_table(["#", "MATCH", "OUTBOUND", "HITS"], rows)


def _logs_text(batch: LogBatch) -> str:
    return "\n".join(
        f"{time.strftime('%H:%M:%S', time.localtime(line.time))} {line.level.upper():<7} "
        f"{line.logger}: {line.message}"
        for line in batch.lines
    )


Action = Callable[[ControlClient, argparse.Namespace], Awaitable[tuple[Any, str]]]


async def _status(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    status = await client.status()
    return status, _status_text(status)


async def _connections(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    conns = await client.connections()
    return conns, _connections_text(conns)


async def _routes(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    routes = await client.routes()
    return routes, _routes_text(routes)


async def _logs(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    batch = await client.logs(limit=args.lines, level=args.level)
    return batch, _logs_text(batch)


async def _reconnect(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = await client.reconnect(args.outbound)
    return result, result.message


async def _select(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = await client.select(args.group, args.outbound)
    return result, result.message


def _delay_result_text(result: DelayResult) -> str:
    rows = [
        [
            ("* " if r.tag == result.selected else "  ") + r.tag,
            r.type,
            _delay_text(r.delay_ms, r.error, r.alive),
        ]
        for r in result.results
    ]
    head = f"{result.outbound}: checked through {result.url}"
    if result.selected:
        head += f"; using {result.selected}"
    return head + "\n" + format_table(["OUTBOUND", "TYPE", "DELAY"], rows)


async def _delay(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = await client.delay(args.outbound, args.url)
    return result, _delay_result_text(result)


async def _close(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = await client.close_connection(args.id)
    return result, result.message


async def _reload(client: ControlClient, args: argparse.Namespace) -> tuple[Any, str]:
    result = await client.reload(args.path)
    return result, result.message


async def _follow_logs(client: ControlClient, args: argparse.Namespace) -> None:
    await client.subscribe("logs", level=args.level, backlog=args.lines)
    async for event in client.events():
        batch = LogBatch.model_validate(event.data)
        if args.json:
            for line in batch.lines:
                print(line.model_dump_json(), flush=True)
        elif batch.lines:
            print(_logs_text(batch), flush=True)


ACTIONS: dict[str, Action] = {
    "status": _status,
    "connections": _connections,
    "routes": _routes,
    "logs": _logs,
    "reconnect": _reconnect,
    "select": _select,
    "delay": _delay,
    "close": _close,
    "reload": _reload,
}


async def _run(args: argparse.Namespace) -> int:
    path = args.socket or default_socket_path()
    try:
        client = await ControlClient.connect(path)
    except ControlConnectionError as exc:
        print(f"ostp-client is not running? {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    async with client:
        try:
            if args.action == "logs" and args.follow:
                await _follow_logs(client, args)
                return 0
            result, text = await ACTIONS[args.action](client, args)
        except ControlError as exc:
            print(f"refused: {exc.message}", file=sys.stderr)
            return EXIT_REFUSED
        except ControlConnectionError as exc:
            print(f"connection lost: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    elif text:
        print(text)
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", help=f"control socket (default {default_socket_path()})", default=None
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("status", help="daemon, outbounds and sessions")
    sub.add_parser("connections", help="live connections")
    sub.add_parser("routes", help="routing rules with hit counts")
    logs = sub.add_parser("logs", help="recent log lines")
    logs.add_argument("-n", "--lines", type=_count, default=100, help="how many (default 100)")
    logs.add_argument("--level", choices=LEVELS, default="debug", help="minimum level")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    reconnect = sub.add_parser("reconnect", help="re-establish an outbound's sessions")
    reconnect.add_argument("outbound", help="outbound tag")
    select = sub.add_parser("select", help="choose the member of a selector group")
    select.add_argument("group", help="selector group tag")
    select.add_argument("outbound", help="member tag")
    delay = sub.add_parser("delay", help="check an outbound (a group: every member) now")
    delay.add_argument("outbound", help="outbound or group tag")
    delay.add_argument("--url", help="URL to fetch (default: the group's test URL)")
    close = sub.add_parser("close", help="close a live connection")
    close.add_argument("id", type=int, help="connection id (see `ctl connections`)")
    reload = sub.add_parser("reload", help="re-read the config file (like SIGHUP)")
    reload.add_argument("path", nargs="?", default=None, help="another config file")
    # The global options are accepted after the action too (`ctl status --socket X`); SUPPRESS
    # keeps a value given before the action when the action's parser does not see one.
    for name in ACTIONS:
        sub.choices[name].add_argument(
            "--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        sub.choices[name].add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


@command("ctl", "query or steer a running daemon through its control socket", _configure)
def _cmd_ctl(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
