"""The one base of every error ostp-client raises on purpose: `OstpClientError`.

`except OstpClientError` catches a refused config, a failed outbound connect, a reload that
could not be applied, a control-protocol line that is not one, ... and nothing that is a bug.
Errors that are also OS errors or bad values keep those bases too (`StartError` is an
`OSError`, `RoutingError` a `ValueError`), so existing `except OSError` handlers still see them.
Stdlib only: the sans-IO modules may import it.
"""

from __future__ import annotations

__all__ = ["OstpClientError"]


class OstpClientError(Exception):
    """Base of the client's own errors."""
