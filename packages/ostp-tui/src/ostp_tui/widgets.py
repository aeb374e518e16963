"""Dashboard widgets: one panel per outbound (state, server, RTT, throughput sparklines)."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from ostp_client.control.protocol import (
    MemberStatus,
    OutboundStatus,
    SessionStatus,
    format_bytes,
)

__all__ = ["HISTORY", "OutboundPanel", "format_duration", "format_rate", "state_style"]

HISTORY = 60
"""Samples kept per sparkline."""

STATE_STYLES = {
    "connected": "bold green",
    "ready": "bold green",
    "connecting": "bold yellow",
    "idle": "bold red",
    "error": "bold red",
}


def state_style(state: str) -> str:
    return STATE_STYLES.get(state.lower(), "bold")


def format_rate(n: float) -> str:
    return f"{format_bytes(n)}/s"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _session_line(session: SessionStatus) -> Text:
    # gaps end a styled run rather than start one (see Dashboard._render_header)
    text = Text("  #" + session.id + " ")
    text.append(session.state.capitalize() + "  ", style=state_style(session.state))
    if session.transport:
        text.append(f"{session.transport}  ")
    rtt = f"{session.rtt_ms:.1f} ms" if session.rtt_ms is not None else "-"
    text.append(f"rtt {rtt}  up {format_duration(session.uptime)}")
    if session.reconnects:
        text.append(f"  ↻{session.reconnects}")
    if session.kernel_drops:  # the daemon fell behind and the kernel dropped datagrams
        text.append(f"  kernel drops {session.kernel_drops}")
    if session.mapped_address:
        text.append(f"  nat {session.mapped_address}")
    return text


def _member_line(member: MemberStatus, selected: str | None) -> Text:
    mark = "▶ " if member.tag == selected else "  "
    text = Text(mark + member.tag + " ", style="bold" if member.tag == selected else "")
    if member.alive is False or not member.usable:
        text.append("down", style=state_style("down"))
        if member.error:
            text.append(f" {member.error}")
    elif member.delay_ms is not None:
        text.append(f"{member.delay_ms:.0f} ms")
    else:
        text.append("-")
    return text


class OutboundPanel(Vertical, can_focus=True):
    """One outbound. Focus it and press `r` to reconnect it (a selector group: `g` chooses
    its next member)."""

    DEFAULT_CSS = """
    OutboundPanel {
        border: round $primary-darken-1;
        width: 1fr;
        height: auto;
        min-height: 7;
        padding: 0 1;
    }
    OutboundPanel:focus { border: round $accent; }
    OutboundPanel Sparkline { height: 1; margin: 0; }
    OutboundPanel .down > .sparkline--max-color { color: $success; }
    OutboundPanel .down > .sparkline--min-color { color: $success-darken-3; }
    OutboundPanel .up > .sparkline--max-color { color: $warning; }
    OutboundPanel .up > .sparkline--min-color { color: $warning-darken-3; }
    """

    def __init__(self, tag: str) -> None:
        super().__init__(id=f"outbound-{_css_id(tag)}")
        self.tag = tag
        self.down: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.up: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.status: OutboundStatus | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="summary")
        yield Sparkline(list(self.down), classes="down", id="spark-down")
        yield Sparkline(list(self.up), classes="up", id="spark-up")
        yield Static(id="sessions")

    def update_status(self, status: OutboundStatus) -> None:
        """Record a new sample; safe to call before the panel is mounted."""
        self.status = status
        self.down.append(status.rate_down)
        self.up.append(status.rate_up)
        if self.is_mounted:
            self._show()

    def on_mount(self) -> None:
        if self.status is not None:
            self._show()

    def _show(self) -> None:
        status = self.status
        if status is None:
            return
        self.border_title = f"{status.id} ({status.type})"
        style = state_style(status.state)
        # one run per style, gaps at the end of a run (see Dashboard._render_header)
        parts = [f"● {status.state.capitalize()}"]
        if status.uptime is not None:
            parts.append(f"up {format_duration(status.uptime)}")
        if status.can_reconnect or status.reconnects:
            parts.append(f"↻ {status.reconnects}")
        line1 = Text(" · ".join(parts), style=style)
        line2 = Text(status.server or "this machine", style="bold")
        if status.rtt_ms is not None:
            line2.append(f" · rtt {status.rtt_ms:.1f} ms", style="")
        line3 = Text(f"↓ {format_rate(status.rate_down)}  ", style="green")
        line3.append(f"↑ {format_rate(status.rate_up)} ", style="yellow")
        line3.append(f"· {status.connections} conns")
        lines = [line1, line2, line3]
        if status.mapped_address:
            lines.append(Text(f"nat {status.mapped_address}"))
        summary = Text("\n").join(lines)
        summary.no_wrap = True
        summary.overflow = "ellipsis"
        self.query_one("#summary", Static).update(summary)
        self.query_one("#spark-down", Sparkline).data = list(self.down)
        self.query_one("#spark-up", Sparkline).data = list(self.up)
        sessions = self.query_one("#sessions", Static)
        if status.members:
            chain = " → ".join(status.chain) if status.chain else status.selected
            head = Text(f"using {chain}", style="bold")
            lines = [head, *(_member_line(m, status.selected) for m in status.members)]
            sessions.update(Text("\n").join(lines))
            sessions.display = True
        elif status.sessions:
            sessions.update(Text("\n").join(_session_line(s) for s in status.sessions))
            sessions.display = True
        else:
            sessions.display = False


def _css_id(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
