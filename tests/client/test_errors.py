"""Every error the client raises on purpose has one base, `OstpClientError` (issue 14)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import ostp_client
from ostp_client.errors import OstpClientError

NOT_YET: set[str] = set()  # names allowed outside the hierarchy for now (none left)


def _client_modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(ostp_client.__path__, "ostp_client.")
        if not info.name.endswith("__main__")
    ]


def test_every_client_exception_derives_from_the_one_base() -> None:
    found: dict[str, type[BaseException]] = {}
    for name in _client_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
            ):
                found[f"{name}.{attr}"] = value
    assert len(found) >= 25, sorted(found)  # the walk saw the package, not an empty list
    strays = sorted(
        qualname
        for qualname, cls in found.items()
        if not issubclass(cls, OstpClientError) and qualname not in NOT_YET
    )
    assert strays == []


def test_errors_that_are_os_errors_stay_os_errors() -> None:
    from ostp_client.dns.resolver import ResolveError
    from ostp_client.inbounds.base import StartError
    from ostp_client.router import RoutingError

    assert issubclass(StartError, OSError)
    assert issubclass(ResolveError, OSError)
    assert issubclass(RoutingError, ValueError)
    assert issubclass(StartError, OstpClientError)
    from ostp_client.transport import TransportError

    assert issubclass(TransportError, OSError) and issubclass(TransportError, OstpClientError)
