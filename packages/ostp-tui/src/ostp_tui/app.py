"""`ostp-tui`: a Textual dashboard attached to a running ostp-client daemon.

It talks to the daemon only through the control socket (`ostp_client.control.protocol` and
the small asyncio client), subscribes to status, connections, routes and logs, and re-attaches
by itself whenever the daemon goes away and comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import ValidationError
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, RichLog, Static

from ostp_client.control.client import ControlError
from ostp_client.control.protocol import (
    LEVELS,
    ConnectionInfo,
    ConnectionList,
    DaemonStatus,
    Event,
    LogBatch,
    LogLine,
    RouteTable,
    default_socket_path,
    format_bytes,
    level_at_least,
)
from ostp_tui.source import Connector, DaemonLink, control_connector
from ostp_tui.widgets import (
    OutboundPanel,
    format_duration,
    format_rate,
    state_style,
)

__all__ = ["Dashboard", "main"]

RETRY_INTERVAL = 1.0
"""Seconds between attempts to reach a daemon that is not there."""
STATUS_INTERVAL_MS = 500
LOG_KEEP = 2000
LOG_LEVEL_STYLES = {
    "debug": "dim",
    "info": "",
    "warning": "yellow",
    "error": "bold red",
    "critical": "bold white on red",
}
FILTER_LEVELS = ("debug", "info", "warning", "error")

ConnKey = Callable[[ConnectionInfo, float], Any]
SORTS: tuple[tuple[str, ConnKey, bool], ...] = (
    ("id", lambda c, now: c.id, False),
    ("destination", lambda c, now: c.destination or "", False),
    ("outbound", lambda c, now: c.outbound or "", False),
    ("down", lambda c, now: c.bytes_down, True),
    ("up", lambda c, now: c.bytes_up, True),
    ("age", lambda c, now: now - c.started_at, True),
)
CONN_COLUMNS = ("ID", "Inbound", "Destination", "Rule", "Outbound", "Up", "Down", "Age")
_COLUMN_SORT = {"ID": 0, "Destination": 1, "Outbound": 2, "Down": 3, "Up": 4, "Age": 5}


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: 64; height: auto; border: round $accent; padding: 1 2; background: $surface;
    }
    """
    TEXT = """[b]ostp-tui keys[/b]

  [b]r[/b]   reconnect the focused outbound (or the first with sessions)
  [b]c[/b]   close the selected connection
  [b]/[/b]   filter connections and log lines (Enter/Esc to leave)
  [b]l[/b]   cycle the minimum log level
  [b]s[/b]   cycle the connection sort (or click a column header)
  [b]tab[/b] move between panels
  [b]?[/b]   this help
  [b]q[/b]   quit

The dashboard re-attaches by itself when the daemon restarts."""

    def compose(self) -> ComposeResult:
        yield Static(self.TEXT)


class Dashboard(App[None]):
    """The dashboard. `connector` opens a link to the daemon (default: the control socket)."""

    TITLE = "ostp-tui"
    CSS = """
    Screen { layout: vertical; }
    #header { height: 1; background: $primary-background; padding: 0 1; }
    #offline { height: auto; padding: 1 2; color: $warning; display: none; }
    #outbounds { height: auto; max-height: 14; }
    #middle { height: 1fr; min-height: 6; }
    #connections { width: 3fr; border: round $primary-darken-2; }
    #routes { width: 2fr; border: round $primary-darken-2; }
    #connections:focus, #routes:focus, #logs:focus { border: round $accent; }
    #logs { height: 10; border: round $primary-darken-2; }
    #filter { dock: bottom; display: none; margin-bottom: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reconnect", "Reconnect"),
        Binding("g", "select_member", "Select member", show=False),
        Binding("c", "close_connection", "Close conn"),
        Binding("slash", "filter", "Filter"),
        Binding("l", "cycle_level", "Log level"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        connector: Connector | None = None,
        retry_interval: float = RETRY_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.socket_path = socket_path or default_socket_path()
        self.connector = connector or control_connector(self.socket_path)
        self.retry_interval = retry_interval
        self.clock = clock
        self.link: DaemonLink | None = None
        self.link_state = "connecting"
        """`connecting`, `attached` or `offline` (no daemon answered)."""
        self.last_error = ""
        self.attaches = 0
        self.events_applied = 0
        self.status: DaemonStatus | None = None
        self.conns: dict[int, ConnectionInfo] = {}
        self.conn_time = 0.0
        self.routes: RouteTable | None = None
        self.log_lines: deque[LogLine] = deque(maxlen=LOG_KEEP)
        self.log_level = "info"
        self.filter_text = ""
        self.sort_index = 0
        self.panels: dict[str, OutboundPanel] = {}
        self.render_errors = 0
        self.header_text = ""

    # -- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield Static(id="offline")
        yield Horizontal(id="outbounds")
        with Horizontal(id="middle"):
            yield DataTable(id="connections", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="routes", cursor_type="row")
        yield RichLog(id="logs", max_lines=LOG_KEEP, wrap=False, markup=False)
        yield Input(id="filter", placeholder="filter connections and logs (Enter to keep)")
        yield Footer()

    def on_mount(self) -> None:
        conns = self.query_one("#connections", DataTable)
        for name in CONN_COLUMNS:
            conns.add_column(name, key=name)
        conns.border_title = "Connections"
        routes = self.query_one("#routes", DataTable)
        for name in ("#", "Match", "Outbound", "Hits"):
            routes.add_column(name, key=name)
        routes.border_title = "Routes"
        self._update_log_title()
        self._update_conn_title()
        self._render_header()
        self.run_worker(self._attach_loop(), exclusive=True, group="link", exit_on_error=False)

    # -- the link to the daemon --------------------------------------------------------------

    async def _attach_loop(self) -> None:
        while True:
            try:
                link = await self.connector()
            except (OSError, ConnectionError) as exc:  # ControlConnectionError is one
                self._set_offline(str(exc))
                await asyncio.sleep(self.retry_interval)
                continue
            self.link = link
            self.link_state = "attached"
            self.attaches += 1
            self.query_one("#offline", Static).display = False
            self.query_one("#logs", RichLog).clear()
            self.log_lines.clear()
            self._render_header()
            try:
                await link.subscribe("status", interval_ms=STATUS_INTERVAL_MS)
                await link.subscribe("connections", interval_ms=STATUS_INTERVAL_MS)
                await link.subscribe("routes", interval_ms=1000)
                await link.subscribe("logs", backlog=200)
                async for event in link.events():
                    try:
                        self.apply_event(event)
                    except Exception as exc:  # a bad message must not take the link down
                        self.render_errors += 1
                        self.log.error(f"cannot apply {event.topic} event: {exc!r}")
            except (OSError, ConnectionError, ControlError, ValidationError) as exc:
                self.last_error = str(exc)
            finally:
                self.link = None
                with contextlib.suppress(Exception):  # a dying link may fail to close
                    await link.aclose()
            self._set_offline(self.last_error or "connection closed")
            await asyncio.sleep(self.retry_interval)

    def _set_offline(self, error: str) -> None:
        self.link_state = "offline"
        self.last_error = error
        self.status = None
        self.conns.clear()
        offline = self.query_one("#offline", Static)
        offline.update(
            Text.assemble(
                ("ostp-client is not running ", "bold"),
                f"(no daemon answered at {self.socket_path}: {error}).\n",
                "Start it with `ostp-client run -c CONFIG`; the dashboard attaches by itself.",
            )
        )
        offline.display = True
        self.query_one("#outbounds", Horizontal).remove_children()
        self.panels = {}
        self._render_connections()
        self._render_header()

    def apply_event(self, event: Event) -> None:
        """Apply one subscription event (public for tests that feed events directly)."""
        if event.topic == "status":
            self.status = DaemonStatus.model_validate(event.data)
            self._render_status()
        elif event.topic == "connections":
            conns = ConnectionList.model_validate(event.data)
            self.conns = {c.id: c for c in conns.connections}
            self.conn_time = conns.time
            self._render_connections()
        elif event.topic == "routes":
            routes = RouteTable.model_validate(event.data)
            if routes != self.routes:
                self.routes = routes
                self._render_routes()
        elif event.topic == "logs":
            batch = LogBatch.model_validate(event.data)
            log = self.query_one("#logs", RichLog)
            for line in batch.lines:
                self.log_lines.append(line)
                if self._log_visible(line):
                    log.write(self._log_text(line))
        self.events_applied += 1

    # -- rendering ---------------------------------------------------------------------------

    def _render_header(self) -> None:
        header = Text()
        header.append("ostp-tui ", style="bold")
        status = self.status
        # Gaps go at the end of a styled run, never at the start of the next one: SVG exports
        # put each run in its own <text>, and librsvg (rsvg-convert) drops leading spaces there.
        if self.link_state == "offline":
            header.append("○ not running  ", style="bold red")
            header.append(f"tried {self.socket_path}")
        elif status is None:
            header.append("… attaching  ", style="bold yellow")
            header.append(str(self.socket_path))
        else:
            header.append(
                f"● {status.state}  ",
                style=state_style("ready" if status.state == "running" else "connecting"),
            )
            tunnel = _tunnel_state(status)
            if tunnel is not None:
                header.append("tunnel ")
                header.append(f"{tunnel.capitalize()}  ", style=state_style(tunnel))
            down = sum(o.rate_down for o in status.outbounds)
            up = sum(o.rate_up for o in status.outbounds)
            header.append(f"↓ {format_rate(down)}  ", style="green")
            header.append(f"↑ {format_rate(up)}  ", style="yellow")
            header.append(
                f"{status.connections_live} conns  up {format_duration(status.uptime)}"
                f"  v{status.version} pid {status.pid}"
            )
        self.header_text = header.plain
        self.query_one("#header", Static).update(header)

    def _render_status(self) -> None:
        status = self.status
        if status is None:
            return
        tags = [o.id for o in status.outbounds]
        if list(self.panels) != tags:
            box = self.query_one("#outbounds", Horizontal)
            box.remove_children()
            self.panels = {tag: OutboundPanel(tag) for tag in tags}
            box.mount_all(self.panels.values())
        for outbound in status.outbounds:
            self.panels[outbound.id].update_status(outbound)
        self._render_header()

    def _conn_matches(self, conn: ConnectionInfo) -> bool:
        if not self.filter_text:
            return True
        needle = self.filter_text.lower()
        hay = f"{conn.destination} {conn.outbound} {conn.inbound} {conn.source} #{conn.id}"
        return needle in hay.lower()

    def _conn_cells(self, conn: ConnectionInfo) -> list[Any]:
        return [
            conn.id,
            conn.inbound,
            conn.destination or "-",
            "default" if conn.rule is None else str(conn.rule),
            # through a group: the group and the member carrying it ("auto → b")
            " → ".join([conn.outbound or "-", *conn.via[1:]]) if conn.via else conn.outbound or "-",
            format_bytes(conn.bytes_up),
            format_bytes(conn.bytes_down),
            format_duration(max(0.0, self.conn_time - conn.started_at)),
        ]

    def _render_connections(self) -> None:
        table = self.query_one("#connections", DataTable)
        wanted = {str(c.id): c for c in self.conns.values() if self._conn_matches(c)}
        for row_key in list(table.rows):
            if row_key.value not in wanted:
                table.remove_row(row_key)
        for key, conn in wanted.items():
            cells = self._conn_cells(conn)
            if key in table.rows:
                for column, value in zip(CONN_COLUMNS, cells, strict=True):
                    table.update_cell(key, column, value)
            else:
                table.add_row(*cells, key=key)
        _, sort_key, reverse = SORTS[self.sort_index]
        now = self.conn_time

        def by(row: Sequence[Any]) -> Any:
            conn = self.conns.get(int(row[0]))
            return sort_key(conn, now) if conn is not None else 0

        table.sort(key=by, reverse=reverse)
        self._update_conn_title()

    def _update_conn_title(self) -> None:
        table = self.query_one("#connections", DataTable)
        title = f"Connections ({len(self.conns)}) sorted by {SORTS[self.sort_index][0]}"
        if self.filter_text:
            title += f"  filter: {self.filter_text!r}"
        table.border_title = title

    def _render_routes(self) -> None:
        table = self.query_one("#routes", DataTable)
        table.clear()
        for rule in self.routes.rules if self.routes else ():
            table.add_row(
                "-" if rule.index is None else str(rule.index),
                rule.match,
                rule.outbound,
                str(rule.hits),
            )

    def _log_visible(self, line: LogLine) -> bool:
        if not level_at_least(line.level, self.log_level):
            return False
        return not self.filter_text or self.filter_text.lower() in line.message.lower()

    def _log_text(self, line: LogLine) -> Text:
        text = Text(time.strftime("%H:%M:%S ", time.localtime(line.time)), style="dim")
        text.append(f"{line.level.upper():<7} ", style=LOG_LEVEL_STYLES.get(line.level, ""))
        text.append(f"{line.logger.removeprefix('ostp_client.')}: ", style="cyan")
        text.append(line.message)
        return text

    def _rerender_logs(self) -> None:
        log = self.query_one("#logs", RichLog)
        log.clear()
        for line in self.log_lines:
            if self._log_visible(line):
                log.write(self._log_text(line))
        self._update_log_title()

    def _update_log_title(self) -> None:
        log = self.query_one("#logs", RichLog)
        log.border_title = f"Logs (≥ {self.log_level})"

    # -- actions -----------------------------------------------------------------------------

    def _reconnect_target(self) -> str | None:
        focused = self.focused
        if isinstance(focused, OutboundPanel):
            return focused.tag
        if self.status is None:
            return None
        for outbound in self.status.outbounds:
            if outbound.can_reconnect:
                return outbound.id
        return None

    async def action_reconnect(self) -> None:
        link, tag = self.link, self._reconnect_target()
        if link is None:
            self.notify("not attached to a daemon", severity="warning")
            return
        if tag is None:
            self.notify("no outbound with sessions to reconnect", severity="warning")
            return
        try:
            result = await link.reconnect(tag)
        except ControlError as exc:
            self.notify(exc.message, title="reconnect refused", severity="error")
        except (OSError, ConnectionError) as exc:
            self.notify(str(exc), title="reconnect failed", severity="error")
        else:
            self.notify(result.message or f"reconnecting {tag}")

    async def action_select_member(self) -> None:
        """On a focused selector group's card: use its next member."""
        link, focused = self.link, self.focused
        status = focused.status if isinstance(focused, OutboundPanel) else None
        if link is None or status is None or not status.can_select or not status.members:
            self.notify("focus a selector group's card to choose its member", severity="warning")
            return
        tags = [m.tag for m in status.members]
        current = tags.index(status.selected) if status.selected in tags else -1
        member = tags[(current + 1) % len(tags)]
        try:
            result = await link.select(status.id, member)
        except ControlError as exc:
            self.notify(exc.message, title="select refused", severity="error")
        except (OSError, ConnectionError) as exc:
            self.notify(str(exc), title="select failed", severity="error")
        else:
            self.notify(result.message or f"{status.id}: {member}")

    async def action_close_connection(self) -> None:
        link = self.link
        table = self.query_one("#connections", DataTable)
        if link is None or table.row_count == 0:
            self.notify("no connection selected", severity="warning")
            return
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        if row_key.value is None:
            return
        conn_id = int(row_key.value)
        try:
            result = await link.close_connection(conn_id)
        except ControlError as exc:
            self.notify(exc.message, title="close refused", severity="error")
        except (OSError, ConnectionError) as exc:
            self.notify(str(exc), title="close failed", severity="error")
        else:
            self.notify(result.message or f"closed #{conn_id}")

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.value = self.filter_text
        field.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._render_connections()
        self._rerender_logs()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self._hide_filter()

    def _hide_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = False
        self.query_one("#connections", DataTable).focus()

    def on_key(self, event: Any) -> None:
        if getattr(event, "key", None) == "escape" and self.query_one("#filter", Input).has_focus:
            self._hide_filter()
            event.stop()

    def action_cycle_level(self) -> None:
        index = FILTER_LEVELS.index(self.log_level) if self.log_level in FILTER_LEVELS else 0
        self.log_level = FILTER_LEVELS[(index + 1) % len(FILTER_LEVELS)]
        self._rerender_logs()

    def action_cycle_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        self._render_connections()

    @on(DataTable.HeaderSelected, "#connections")
    def _sort_by_header(self, event: DataTable.HeaderSelected) -> None:
        label = str(event.column_key.value)
        if label in _COLUMN_SORT:
            self.sort_index = _COLUMN_SORT[label]
            self._render_connections()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def _tunnel_state(status: DaemonStatus) -> str | None:
    """Overall state of the outbounds that have sessions (ostp); None when there are none."""
    states = {o.state.lower() for o in status.outbounds if o.can_reconnect or o.sessions}
    if not states:
        return None
    for state in ("connected", "connecting", "idle"):
        if state in states:
            return state
    return sorted(states)[0]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `ostp-tui`."""
    parser = argparse.ArgumentParser(
        prog="ostp-tui", description="dashboard for a running ostp-client daemon"
    )
    parser.add_argument(
        "--socket", default=None, help=f"control socket (default {default_socket_path()})"
    )
    parser.add_argument(
        "--log-level", choices=LEVELS, default="info", help="initial log filter (default info)"
    )
    args = parser.parse_args(argv)
    app = Dashboard(args.socket)
    app.log_level = args.log_level if args.log_level in FILTER_LEVELS else "error"
    app.run()
