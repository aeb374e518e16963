"""System proxy integration: point the desktop at the client, and put everything back.

``SystemProxy`` is the backend-neutral API (GNOME gsettings, KDE kioslaverc, Windows WinINet);
``SystemProxyGuard`` is what the daemon wraps its run in; ``add_sysproxy_commands`` adds
``ostp-client sysproxy status | set | restore`` to the CLI.
"""

from .backend import (
    DEFAULT_BYPASS,
    Backend,
    ProxyTarget,
    SystemProxyError,
    SystemProxyUnavailable,
)
from .commands import add_sysproxy_commands, run_sysproxy_command
from .manager import ProxyStatus, SystemProxy, SystemProxyGuard

__all__ = [
    "DEFAULT_BYPASS",
    "Backend",
    "ProxyStatus",
    "ProxyTarget",
    "SystemProxy",
    "SystemProxyError",
    "SystemProxyGuard",
    "SystemProxyUnavailable",
    "add_sysproxy_commands",
    "run_sysproxy_command",
]
