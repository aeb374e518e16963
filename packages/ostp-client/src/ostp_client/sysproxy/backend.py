"""What every system-proxy backend provides, and the settings the client applies.

A backend is a small key/value store over the OS setting it owns (gsettings keys, kioslaverc
entries, WinINet registry values). Values are backend-encoded strings, and ``None`` means
"absent": the key did not exist or held its default, and restoring it deletes/resets it rather
than writing an empty value. That single convention is what makes restore exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ostp_client.errors import OstpClientError

Values = Mapping[str, str | None]
"""Backend key -> encoded value, ``None`` meaning absent (delete / reset on write)."""

DEFAULT_BYPASS: tuple[str, ...] = (
    "localhost",
    "127.0.0.0/8",
    "::1",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "<local>",
)
"""Hosts that never go through the proxy: loopback and RFC 1918 private networks.

Entries are host names (``*`` wildcards allowed), IP addresses or CIDR networks; each backend
translates them into its own syntax. ``<local>`` (names without a dot) is understood by
WinINet only and dropped elsewhere.
"""


# Separators of the backends' list syntaxes, quotes and whitespace never occur in a host.
_BAD_HOST_CHARS = frozenset(" ;,'\"\t\r\n")


class SystemProxyError(OstpClientError):
    """A system proxy setting could not be read or written (message says which and why)."""


class SystemProxyUnavailable(SystemProxyError):
    """No supported system proxy mechanism on this machine (headless, unknown desktop...)."""


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """The local proxy the system should point at."""

    host: str
    """Address of the local SOCKS5+HTTP proxy, normally ``127.0.0.1``."""
    port: int
    """Its port (the spec's default ``socks5_bind`` is 1088)."""
    bypass: tuple[str, ...] = field(default=DEFAULT_BYPASS)
    """Destinations to reach directly; see ``DEFAULT_BYPASS``."""

    @property
    def url_host(self) -> str:
        """The host as written in ``host:port`` forms (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def __post_init__(self) -> None:
        if (
            not self.host
            or any(c in self.host for c in " ;,\n\r\t'\"")
            or self.host != self.host.strip()
        ):
            raise ValueError(f"invalid proxy host {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid proxy port {self.port}")


class Backend(Protocol):
    """One system proxy mechanism. Implementations do blocking I/O (subprocess, registry)."""

    @property
    def name(self) -> str:
        """Short stable name stored in the state file: ``gnome``, ``kde`` or ``windows``."""
        ...

    @property
    def switch_key(self) -> str:
        """The key that turns the proxy on/off; written last on apply, first on restore."""
        ...

    def check(self) -> None:
        """Raise ``SystemProxyUnavailable`` with a reason when the backend cannot work here."""
        ...

    def read(self) -> dict[str, str | None]:
        """Current value of every key this backend manages (``None`` = absent/default)."""
        ...

    def desired(self, target: ProxyTarget) -> dict[str, str | None]:
        """Values that point the system at ``target``, in write order (switch key last)."""
        ...

    def write(self, values: Values) -> None:
        """Write ``values`` in their order (``None`` deletes/resets), then notify the system."""
        ...

    def mismatches(self, expected: Values) -> list[str]:
        """Keys of ``expected`` the system does not hold now (read-back check after a write:
        ``gsettings`` exits 0 even when dconf could not commit)."""
        ...

    def is_enabled(self, values: Values) -> bool:
        """Whether ``values`` (as returned by ``read``) describe an active manual proxy."""
        ...
